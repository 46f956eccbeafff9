"""M3DM's hyperparameters: the official code's where the paper is silent, the paper's where it states them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmiad.methods.hparams import require
from mmiad.methods.memorybank.settings import BankSettings
from mmiad.postprocess.smoothing import SMOOTHINGS

BANKS = ("point", "rgb", "fused")
VARIANTS = {"triple": BANKS, "double": BANKS[:2]}
POINT_CORESETS = ("all_rows", "foreground")
UFF_SCOPES = ("all", "category")
UFF_PATCHES = ("foreground", "nonzero")
#: The official double-bank variant divides s* and the reweighting distances by this before the image score.
DOUBLE_SCORE_SCALE = 1000.0


@dataclass
class M3DMConfig(BankSettings):
    """M3DM hyperparameters (the official code's where the paper is silent, the paper's where it states them;
    the official code's remaining choices behind ``compat``).

    The pipeline fields are :class:`~mmiad.methods.settings.MethodSettings`' (extractors: ``weightfree``;
    ``dino-pointmae`` is the paper's, with real weights); the memory-bank fields (coreset fraction and ε, seed,
    reweighting k, kNN backend, memory budget per bank) are :class:`~mmiad.methods.memorybank.settings.BankSettings`';
    ``seed`` also seeds UFF's initialisation and shuffling; ``device`` is where UFF trains and fuses and where the
    banks' coreset and kNN run, ``precision`` the autocast of UFF's networks (the banks stay float32).

    Attributes:
        profile: Preprocessing profile (``m3dm``: plane removal, RGB background zeroed).
        variant: ``triple`` (official ``DINO+Point_MAE+Fusion``: point, RGB and fused banks) or ``double``
            (official ``DINO+Point_MAE``: point and RGB banks, no UFF, image scores with the official /1000).
        point_coreset: ``all_rows`` (official): the point bank holds every patch of every image, background
            included, the coreset keeps 10 % of *all* rows (starting at row 0) and test patches are all searched;
            in ``triple`` the bank then drops rows with an exact zero and gains one all-zero row, as
            ``TripleFeatures.run_coreset`` does. ``foreground``: only foreground patches are stored, 10 % of them
            kept, and background test patches score 0.
        uff_scope: ``all`` (official ``fusion_pretrain.py``): one UFF trained on the union of all categories of a
            run (:meth:`M3DM.fit_shared`), stored in every category's model file; ``category``: one per category.
        max_train_samples: Training samples used per category, in order (official ``--max_sample 400`` keeps the
            first 401; only Eyecandies' 1000-sample categories are affected). None uses all.
        rgb_grid: RGB patch grid (28).
        point_grid: Point and fused patch grid (56).
        use_uff: Train and use UFF; without it the fused feature is the plain concatenation (users of the
            official code report UFF often hurts).
        epochs: UFF epochs (official default 3).
        batch_size: Images per UFF InfoNCE batch (official 16).
        accum_iter: Batches whose gradients are accumulated per optimizer step (README command: 16); the
            learning rate is updated at the start of each group. A partial group at the end of an epoch is applied
            (the official code discards it, so sets under 256 images never train; under ``compat`` it is discarded).
        learning_rate: AdamW learning rate (README: 0.003).
        weight_decay: AdamW weight decay: 0.01, what the official code trains with (it parses 1.5e-6 but never
            passes it, so AdamW's default applies; the paper is silent). 1.5e-6 is the intended value.
        warmup_epochs: Linear warm-up before the cosine schedule (1).
        uff_patches: Which patches enter InfoNCE: ``foreground`` (the projected valid-pixel mask) or ``nonzero``
            (the literal test of the official ``FeatureFusionBlock.forward``: rows whose point feature has no zero
            channel). For Point-MAE features, which are never exactly zero on the foreground, both select the same
            rows; for FPFH histograms, which almost always have an empty bin, ``nonzero`` selects (almost) nothing
            and UFF would not train, hence the default.
        uff_max_patches: Cap on patches per InfoNCE step (None = all; logits are N×N).
        lambdas: Weights of the (point, rgb, fused) scores and maps before DLF (official 1.0, 0.1, 1.0).
        ocsvm_nu: ``nu`` of both one-class SVMs (0.5).
        ocsvm_max_iter: Their ``max_iter`` (1000).
        smoothing: ``gaussian`` (σ=4) or ``pil_uint8`` (official PIL blur of a uint8 copy).
        sigma: Blur σ (PIL radius for ``pil_uint8``).
        uff_checkpoint: A UFF checkpoint written by the official ``fusion_pretrain.py`` (``mmiad import --method
            m3dm``): UFF is loaded from it (strictly) instead of trained; the model file keeps the weights.

    ``compat`` follows the official code: PIL blur, mixed normalisation statistics, RGB and fused coresets sized
    from the point coreset, AdamW weight decay 0.01, UFF trained on the position-scrambled RGB rows of the
    official feature dump (:func:`~mmiad.methods.m3dm.fusion.official_training_rgb`).
    """

    profile: str = "m3dm"
    variant: str = "triple"
    point_coreset: str = "all_rows"
    uff_scope: str = "all"
    max_train_samples: int | None = 401
    rgb_grid: int = 28
    point_grid: int = 56
    use_uff: bool = True
    epochs: int = 3
    batch_size: int = 16
    accum_iter: int = 16
    learning_rate: float = 0.003
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    uff_patches: str = "foreground"
    uff_max_patches: int | None = None
    lambdas: tuple[float, float, float] = (1.0, 0.1, 1.0)
    ocsvm_nu: float = 0.5
    ocsvm_max_iter: int = 1000
    smoothing: str = "gaussian"
    sigma: float = 4.0
    uff_checkpoint: str | None = None

    # No scoring-time key of its own: the decision-layer fusion SVMs are fitted on the smoothed, λ-weighted maps
    # and scores, so smoothing, σ and λ are part of the trained model (``inference_keys`` stays the base's).

    def compat_values(self) -> dict[str, Any]:
        """The official code blurs a uint8 copy of the maps through PIL."""
        return {"smoothing": "pil_uint8"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lambdas = tuple(float(v) for v in self.lambdas)  # type: ignore[assignment]
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"unknown smoothing {self.smoothing!r}; expected one of {SMOOTHINGS}")
        if len(self.lambdas) != 3:
            raise ValueError(f"lambdas needs three weights (point, rgb, fused), got {self.lambdas}")
        self.check_bank_settings()
        for key, minimum in (("epochs", 0), ("batch_size", 1), ("accum_iter", 1), ("rgb_grid", 1), ("point_grid", 1)):
            require(getattr(self, key) >= minimum, key, getattr(self, key), f"must be at least {minimum}")
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be positive")
        require(0 < self.ocsvm_nu <= 1, "ocsvm_nu", self.ocsvm_nu, "must be in (0, 1]")
        require(self.sigma >= 0, "sigma", self.sigma, "must be at least 0")
        for name, value, allowed in (
            ("variant", self.variant, tuple(VARIANTS)),
            ("point_coreset", self.point_coreset, POINT_CORESETS),
            ("uff_scope", self.uff_scope, UFF_SCOPES),
            ("uff_patches", self.uff_patches, UFF_PATCHES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        limit = self.max_train_samples
        require(limit is None or limit >= 1, "max_train_samples", limit, "must be at least 1 (or null for all)")

    @property
    def banks(self) -> tuple[str, ...]:
        """The banks of the variant, in DLF order."""
        return VARIANTS[self.variant]

    @property
    def trains_uff(self) -> bool:
        """Whether a UFF is trained (only the triple variant fuses)."""
        return self.use_uff and self.variant == "triple"
