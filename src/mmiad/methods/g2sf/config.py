"""G2SF's hyperparameters: the official ``config_parse.py`` (ctaoaa/G2SF at d309f2a) and its hard-coded constants.

Where the released code does something that looks unintended, the default is what the code does (it is the only
executable specification, and the released weights were trained with it) and the intended form is a named option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mmiad.methods.memorybank.settings import BankSettings
from mmiad.postprocess.smoothing import SMOOTHINGS

SCORING_MODES = ("min", "max", "average", "zero")
CONSISTENCY_FORMS = ("broadcast", "per_sample")


@dataclass
class G2SFConfig(BankSettings):
    """G2SF hyperparameters (official defaults).

    The pipeline fields are :class:`~mmiad.methods.settings.MethodSettings`' (``dino-pointmae512`` is the paper's
    DINO ViT-B/8 + Point-MAE with 512 groups; ``weightfree`` runs without weights), the coreset fields
    :class:`~mmiad.methods.memorybank.settings.BankSettings`' (10 % per modality, ε 0.9). ``seed`` also seeds the
    synthesis, the patch split, the sampler, the noise, dropout and the LSPN initialisation.

    Attributes:
        profile: Preprocessing profile (``m3dm``: plane removal, RGB background zeroed, as G2SF's preprocessors).
        rgb_grid: RGB patch grid of the bank (28; G2SF keeps DINO's grid, no 2× duplication).
        point_grid: Point grid and fusion grid (56); RGB patches are nearest-upsampled to it at scoring.
        top_k: Nearest coreset indices kept per patch and modality (20).
        n_anomalies: Pseudo-anomalous samples per category (800).
        train_fraction: Share of the pseudo patches in the training half (0.5; the split is at patch level).
        n_sources_per_category: 3D anomaly-source clouds per category; None: the official 8 (24 for Eyecandies).
        hidden: Branch hidden width (512).
        emb_dim: Branch output width (128).
        dropout: Dropout of the branches and the head (0.5).
        epochs: LSPN epochs (80).
        batch_size: Cap on the batch (8192); the batch is ``min(cap, ⌊0.7·N⌋ // 20)``.
        learning_rate: Adam learning rate of the LSPN (1.5e-4; ``--lr``).
        scale_learning_rate: Adam learning rate of the global scale θ (5e-3).
        weight_decay: Adam weight decay of both (1e-4).
        noise: Input noise radius as a fraction of μ (0.1).
        loss_weights: (L_sep, L_mar, L_sc, L_cma/perm, L_cns, L1) = (1, 10, 3, 20, 40, 5e-4); L2 has weight 0.
        alpha: Exponent of the L_sep weights (2).
        perc: Quantile of L_mar (1 = max).
        anchor: A: L_cns compares ranks 1..A and A+1..2A; scoring pairs A+1 prototypes (5).
        magnitude: β_mag of L_cns (1.2).
        consistency: ``broadcast`` (official: the first L_cns group averages a B×B matrix, every sample compared
            with every sample's distance ratio) or ``per_sample`` (the intended diagonal form).
        checkpoint_first_epoch: The official trainer never checkpoints on the first epoch's validation
            (Lightning's epoch counter); True lets it compete.
        scoring_mode: Aggregation over the A+1 prototypes (``min``; ``max``, ``average``, ``zero`` = rank 0).
        keep_last_component: The official Perlin mask drops the last connected component (its loop stops at
            n−1); True keeps it.
        full_bbox: The official ``shift_mask`` cuts a moved component from its bounding box with exclusive upper
            bounds (its last row and column are lost); True keeps the whole component.
        smoothing: ``gaussian`` (σ=4, default) or ``pil_uint8`` (official ``KNNGaussianBlur``, uint8 copy; compat).
        sigma: Blur σ (PIL radius for ``pil_uint8``).
        official_fusion: A folder of the official release (``<class>/fusion/MMScoringTrainerV2.pth``,
            ``score_mean.npy``, ``global_scale.npy``; ``mmiad import --method g2sf``): the LSPN, μ and θ are read
            from it instead of synthesised and trained; the banks are still built from the training data.
        z_offset: Range of the ±offset added to a pasted 3D patch, in the cloud's units (2e-4..2e-3: 0.2–2 mm
            on mmiad's metric clouds of every format, see the README).
    """

    profile: str = "m3dm"
    rgb_grid: int = 28
    point_grid: int = 56
    top_k: int = 20
    n_anomalies: int = 800
    train_fraction: float = 0.5
    n_sources_per_category: int | None = None
    hidden: int = 512
    emb_dim: int = 128
    dropout: float = 0.5
    epochs: int = 80
    batch_size: int = 8192
    learning_rate: float = 1.5e-4
    scale_learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    noise: float = 0.1
    loss_weights: tuple[float, float, float, float, float, float] = (1.0, 10.0, 3.0, 20.0, 40.0, 5e-4)
    alpha: float = 2.0
    perc: float = 1.0
    anchor: int = 5
    magnitude: float = 1.2
    consistency: str = "broadcast"
    checkpoint_first_epoch: bool = False
    scoring_mode: str = "min"
    keep_last_component: bool = False
    full_bbox: bool = False
    smoothing: str = "gaussian"
    sigma: float = 4.0
    z_offset: tuple[float, float] = (2e-4, 2e-3)
    official_fusion: str | None = None

    paper_extractors: ClassVar[str] = "dino-pointmae512"

    def compat_values(self) -> dict[str, Any]:
        """The official code blurs a uint8 copy of the map through PIL."""
        return {"smoothing": "pil_uint8"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_bank_settings()
        self.loss_weights = tuple(float(v) for v in self.loss_weights)  # type: ignore[assignment]
        self.z_offset = tuple(float(v) for v in self.z_offset)  # type: ignore[assignment]
        if len(self.loss_weights) != 6:
            raise ValueError(f"loss_weights needs six weights, got {self.loss_weights}")
        if len(self.z_offset) != 2 or not 0 <= self.z_offset[0] <= self.z_offset[1]:
            raise ValueError(f"z_offset must be (low, high) with 0 <= low <= high, got {self.z_offset}")
        for name, value, allowed in (
            ("smoothing", self.smoothing, SMOOTHINGS),
            ("scoring_mode", self.scoring_mode, SCORING_MODES),
            ("consistency", self.consistency, CONSISTENCY_FORMS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if self.top_k < 2 * self.anchor + 1:
            raise ValueError(f"top_k ({self.top_k}) must cover the 2·anchor+1 ranks L_cns uses")
        if self.n_sources_per_category is not None and self.n_sources_per_category < 1:
            raise ValueError("n_sources_per_category must be positive (or None for the official count)")
        if self.n_anomalies < 2 or not 0 < self.train_fraction < 1 or self.epochs < 1:
            raise ValueError("need n_anomalies >= 2, 0 < train_fraction < 1 and epochs >= 1")
        if self.rgb_grid < 1 or self.point_grid % self.rgb_grid:
            raise ValueError("point_grid must be a multiple of rgb_grid (RGB patches are repeated onto it)")
