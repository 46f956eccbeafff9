"""Uni-RCM hyperparameters: the published numbers' settings as defaults, the alternatives behind named options.

Where the paper fixes a value, the default is the paper's. Where it leaves a value open, the default is what the
official inference (``uni_rcm_infer.py``) ran to produce the published numbers: the ORQ residual norm of each
modality is divided by its per-image maximum (``orq_normalization="image_max"``) and weighted β2D=0.05,
β3D=0.10. Eq. 8 does not say at which scale the ORQ term enters; raw norms are in feature units and can swamp
the mapping term. The paper-literal variant (raw norms, β=0.1 for both, as its text states) is
``orq_normalization="none", beta_2d=0.1, beta_3d=0.1``. Nothing here is rewritten after construction:
``compat`` is read where it matters (smoothing and the per-metric normalisations at scoring time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmiad.methods.hparams import require
from mmiad.methods.settings import MethodSettings
from mmiad.methods.unircm.blocks import BRANCHES
from mmiad.methods.unircm.orq import INITS as ORQ_INITS

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MSE_NORMALIZATIONS = ("none", "feature_rms")
ORQ_NORMALIZATIONS = ("image_max", "none")
MICRO_BATCH_NORMS = ("exact", "per_micro_batch")


@dataclass
class UniRCMConfig(MethodSettings):
    """Uni-RCM hyperparameters (see the module docstring for where each default comes from).

    The pipeline fields (extractors, image size, weights, profile, device, compat) are
    :class:`~mmiad.methods.settings.MethodSettings`'.

    Attributes:
        grid_size: Side of the feature grid the networks run on (56).
        hidden: Hidden size of the reference-guided blocks (512).
        num_blocks: Number of reference-guided blocks (3).
        branches: ``rfi+ram`` (full), ``rfi``, ``ram`` or ``none`` (CFM's MLP; paper Tab. III baseline).
        use_orq: Add the ORQ score (Tab. III "+ORQ").
        epochs: Training epochs (200).
        batch_size: Images per global optimisation step (32), split over ranks under torchrun.
        learning_rate: Adam learning rate (3e-4).
        mse_weight: λ of the MSE term (0.01).
        mse_normalization: ``none`` (paper: squared error of the raw features) or ``feature_rms`` (squared error
            divided by the nominal features' mean square per modality, measured before training). λ=0.01 was set
            for DINO/Point-MAE features of roughly unit scale; on features hundreds of times larger (FPFH in the
            weight-free preset) the raw MSE term swamps the cosine term the scores are made of.
        seed: Seed of initialisation, shuffling and k-means (115).
        beta_2d: ORQ weight of the 2D factor (0.05, official; the paper's text says 0.1).
        beta_3d: ORQ weight of the 3D factor (0.10).
        orq_normalization: ``image_max`` (official: each ORQ map, zero on the background, divided by its
            per-image maximum when that is > 0, so the ORQ term lies in [0, β]) or ``none`` (paper-literal: the raw
            residual norm, in feature units).
        orq_layers: Cascaded codebooks per modality (4).
        codebook_size_2d: Codes per 2D layer (4096).
        codebook_size_3d: Codes per 3D layer (1024).
        orq_iterations: k-means iterations per layer (20).
        orq_init: k-means init, ``random`` (official) or ``kmeans++``.
        orq_max_points: Fit the ORQ on at most this many foreground rows (seeded subsample); None uses all.
        use_faiss: Use faiss k-means when importable.
        smoothing: ``gaussian`` (paper, σ=4), ``box_cascade``, ``pil_uint8`` or ``none``; ignored under compat.
        sigma: Smoothing σ in input pixels.
        store_dtype: dtype of the stored training grids (``float16`` halves the memory of big runs).
        memory_budget_gb: Memory training may use, in GiB: the training step (parameters, Adam state, one
            micro-batch's activations) and the stored training grids share it. The step is planned first (a batch
            that does not fit is split into micro-batches, see ``micro_batch``); the grids get the rest and
            spill beyond it to memory-mapped files in the feature cache folder, read back per batch with
            identical results. None: 80 % of the available RAM (on CUDA: of the free GPU memory for the step,
            and 80 % of the available RAM for the grids). Too small for one image per micro-batch: training
            refuses to start, in one line.
        micro_batch: Images per forward/backward pass; None chooses the largest that fits ``memory_budget_gb``.
            Gradients of the micro-batches of a batch are accumulated, so ``batch_size`` keeps its meaning.
        micro_batch_norm: BatchNorm statistics when a batch is split: ``exact`` (whole-batch statistics and
            gradients, as training the batch whole; about ``num_blocks`` + 1 passes per step) or
            ``per_micro_batch`` (each micro-batch normalised on its own, as gradient accumulation in the
            official code would; no extra cost, not equal to whole-batch training).
        activation_checkpointing: Recompute each block's activations in the backward pass instead of keeping
            them (about a third more compute, a fraction of the activation memory). None: only when that lets
            the whole batch fit the budget where it otherwise would not (cheaper than splitting it with exact
            BatchNorm), or when not even one image fits without it.
        checkpoint_dir: Save the training state there after every epoch and continue from it when the same
            training is run again (:mod:`~mmiad.methods.unircm.resume`); None (default) saves nothing. Not
            available under torchrun with several processes.

    ``compat`` applies the official smoothing and normalisations: pixel and AUPRO maps blurred by PIL's GaussianBlur
    (radius σ) on a uint8 copy, the image score from the 5×5/7×7 box cascade, CFM's per-metric normalisations;
    ``mmiad test`` then also uses the papers' sampled AUPRO (99 thresholds). The ORQ scoring is the official one by
    default either way, and follows ``orq_normalization``/``beta_*``.
    """

    grid_size: int = 56
    hidden: int = 512
    num_blocks: int = 3
    branches: str = "rfi+ram"
    use_orq: bool = True
    epochs: int = 200
    batch_size: int = 32
    learning_rate: float = 3e-4
    mse_weight: float = 0.01
    mse_normalization: str = "none"
    seed: int = 115
    beta_2d: float = 0.05
    beta_3d: float = 0.10
    orq_normalization: str = "image_max"
    orq_layers: int = 4
    codebook_size_2d: int = 4096
    codebook_size_3d: int = 1024
    orq_iterations: int = 20
    orq_init: str = "random"
    orq_max_points: int | None = None
    use_faiss: bool = False
    smoothing: str = "gaussian"
    sigma: float = 4.0
    store_dtype: str = "float32"
    memory_budget_gb: float | None = None
    micro_batch: int | None = None
    micro_batch_norm: str = "exact"
    activation_checkpointing: bool | None = None
    checkpoint_dir: str | None = None

    inference_keys = MethodSettings.inference_keys | {"smoothing", "sigma", "beta_2d", "beta_3d", "orq_normalization"}

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, allowed in (
            ("branches", BRANCHES),
            ("mse_normalization", MSE_NORMALIZATIONS),
            ("store_dtype", tuple(STORE_DTYPES)),
            ("orq_normalization", ORQ_NORMALIZATIONS),
            ("micro_batch_norm", MICRO_BATCH_NORMS),
            ("orq_init", ORQ_INITS),
        ):
            require(getattr(self, key) in allowed, key, getattr(self, key), f"expected one of {', '.join(allowed)}")
        for key in ("hidden", "num_blocks", "batch_size", "orq_layers", "codebook_size_2d", "codebook_size_3d"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "must be at least 1")
        require(
            1 <= self.grid_size <= self.image_size,
            "grid_size",
            self.grid_size,
            f"must be in [1, image_size={self.image_size}]",
        )
        for key in ("beta_2d", "beta_3d"):  # an edited model file or a direct call may carry null
            value = getattr(self, key)
            require(isinstance(value, int | float) and not isinstance(value, bool), key, value, "must be a number")
        for key in ("epochs", "orq_iterations", "mse_weight", "beta_2d", "beta_3d", "sigma"):
            require(getattr(self, key) >= 0, key, getattr(self, key), "must be at least 0")
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be positive")
        budget, micro, most = self.memory_budget_gb, self.micro_batch, self.orq_max_points
        require(budget is None or budget >= 0, "memory_budget_gb", budget, "must be at least 0 (or null)")
        require(micro is None or micro >= 1, "micro_batch", micro, "must be at least 1 (or null)")
        require(most is None or most >= 1, "orq_max_points", most, "must be at least 1 (or null for all)")
        require(
            self.checkpoint_dir is None or bool(str(self.checkpoint_dir).strip()),
            "checkpoint_dir",
            self.checkpoint_dir,
            "names no folder (it would be the current one): give a folder, or leave it unset to save nothing",
        )
