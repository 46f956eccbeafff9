"""Uni-RCM hyperparameters: the paper's values as defaults, the official code's deviations behind ``compat``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mmiad.methods.settings import MethodSettings
from mmiad.methods.unircm.blocks import BRANCHES

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MSE_NORMALIZATIONS = ("none", "feature_rms")


@dataclass
class UniRCMConfig(MethodSettings):
    """Uni-RCM hyperparameters (paper defaults; the official code's deviations sit behind ``compat``).

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
        beta_2d: ORQ weight for 2D; None → 0.1 (paper) or 0.05 (compat).
        beta_3d: ORQ weight for 3D; None → 0.1.
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
        memory_budget_gb: RAM for the training grids; beyond it they spill to memory-mapped files (in the feature
            cache folder) and are read back per batch, with identical results.
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
    beta_2d: float | None = None
    beta_3d: float | None = None
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
    memory_budget_gb: float = 4.0

    def compat_values(self) -> dict[str, Any]:
        """The official inference scripts weight the 2D ORQ score by 0.05 (the paper says 0.1)."""
        return {"beta_2d": 0.05}

    def resolved(self) -> UniRCMConfig:
        """As :meth:`MethodSettings.resolved`, then an unset β takes the paper's 0.1."""
        settings = super().resolved()
        if settings.beta_2d is None or settings.beta_3d is None:
            settings = dataclasses.replace(
                settings,
                beta_2d=0.1 if settings.beta_2d is None else settings.beta_2d,
                beta_3d=0.1 if settings.beta_3d is None else settings.beta_3d,
            )
        return settings

    def __post_init__(self) -> None:
        if self.branches not in BRANCHES:
            raise ValueError(f"unknown branches {self.branches!r}; expected one of {BRANCHES}")
        if self.mse_normalization not in MSE_NORMALIZATIONS:
            raise ValueError(
                f"unknown mse_normalization {self.mse_normalization!r}; expected one of {MSE_NORMALIZATIONS}"
            )
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"unknown store_dtype {self.store_dtype!r}; expected one of {tuple(STORE_DTYPES)}")
        if self.grid_size > self.image_size or self.epochs < 0 or self.batch_size < 1 or self.orq_layers < 1:
            raise ValueError("need grid_size <= image_size, epochs >= 0, batch_size >= 1 and orq_layers >= 1")
