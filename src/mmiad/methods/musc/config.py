"""MuSc-V2 hyperparameters: the official ``configs/muscv2.yaml`` and code constants, with named alternatives."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mmiad.methods.musc.msm import minimum_batch
from mmiad.methods.musc.snamd import SNAMD_3D_POOLS
from mmiad.methods.settings import MethodSettings

MODALITIES = ("both", "2d", "3d")
SMOOTHINGS_3D = ("pil_uint8", "gaussian", "none")


@dataclass
class MuScConfig(MethodSettings):
    """Everything that changes MuSc-V2's output. Defaults are the official code's.

    The pipeline fields (extractors, profile, image size, weights, random init, device, precision) are
    :class:`~mmiad.methods.settings.MethodSettings`'; ``compat`` changes nothing (the defaults are the official
    code's already).

    Attributes:
        modality: ``both`` (2D+3D, with CAE), ``2d`` or ``3d``.
        extractors: Extractor preset (``weightfree``; ``dino-pointmae`` is the paper's backbone).
        profile: Offline preprocessing profile.
        image_size: Model input side (official 224).
        image_layers: 0-based ViT blocks scored separately and averaged (official ``feature_layers`` 3, 7, 11).
            Extractors without layers (texture) give one.
        r_list: SNAMD aggregation degrees (official 1, 3, 5); ``(1,)`` turns SNAMD off (ablation "MSM only").
        snamd_3d_pool: ``official`` (adjacent-channel pooling of the degrees, as the code) or ``degrees``
            (paper-literal mean over degrees); see :mod:`~mmiad.methods.musc.snamd`.
        curvature_threshold: Flat/curved split of IPG and 3D SNAMD (official 0.01).
        ipg: Iterative point grouping (official on); off gives Point-MAE's kNN groups.
        ipg_step: Points added per IPG step (official 80).
        num_group: Groups per cloud for per-point 3D extractors (FPFH), as Point-MAE's 1024.
        group_size: Points per group for per-point 3D extractors, as Point-MAE's 128.
        normalize_cloud: Centre each cloud and scale it to the unit sphere before Point-MAE (official
            ``pc_normalize_mvtec``); not applied to FPFH, whose radii are metric.
        interval: Fraction of the other samples the interval average keeps (official 0.3).
        cae: Cross-modal anomaly enhancement in ``both`` mode (off: each modality scored alone, maps summed).
        rscon_k: RsCon windows (official 1, 7); empty or containing 0 turns RsCon off.
        smoothing_3d: ``pil_uint8`` (official ``KNNGaussianBlur(4)``), ``gaussian`` (σ=4) or ``none``.
        divide_num: Score within this many random disjoint subsets (official MuSc ``divide_num``; 1 = whole batch).
        seed: Seed of the subset split.
        chunk_size: Reference samples per distance block (bounds memory, not results).
        allow_mixed_sizes: Accept a batch whose images have different original sizes (default: an error).
        weights_dir: Folder with pretrained checkpoints (deep presets).
        random_init: Allow random extractor weights (tests and speed benchmarks only).
        device: Where the extractors run (``auto``, ``cpu``, ``cuda``, ``cuda:N``; see :mod:`mmiad.utils.compute`).
        precision: Autocast of the extractors (``fp32``, the official; ``bf16``; ``fp16``).
    """

    modality: str = "both"
    image_layers: tuple[int, ...] = (3, 7, 11)
    r_list: tuple[int, ...] = (1, 3, 5)
    snamd_3d_pool: str = "official"
    curvature_threshold: float = 0.01
    ipg: bool = True
    ipg_step: int = 80
    num_group: int = 1024
    group_size: int = 128
    normalize_cloud: bool = True
    interval: float = 0.3
    cae: bool = True
    rscon_k: tuple[int, ...] = (1, 7)
    smoothing_3d: str = "pil_uint8"
    divide_num: int = 1
    seed: int = 0
    chunk_size: int = 16
    allow_mixed_sizes: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.image_layers = tuple(int(x) for x in self.image_layers)
        self.r_list = tuple(int(x) for x in self.r_list)
        self.rscon_k = tuple(int(x) for x in self.rscon_k)
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if self.snamd_3d_pool not in SNAMD_3D_POOLS:
            raise ValueError(f"unknown snamd_3d_pool {self.snamd_3d_pool!r}; expected one of {SNAMD_3D_POOLS}")
        if self.smoothing_3d not in SMOOTHINGS_3D:
            raise ValueError(f"unknown smoothing_3d {self.smoothing_3d!r}; expected one of {SMOOTHINGS_3D}")
        if self.chunk_size < 1 or self.divide_num < 1 or self.ipg_step < 1:
            raise ValueError("chunk_size, divide_num and ipg_step must be positive")
        minimum_batch(self.interval)  # validates the interval

    @property
    def minimum_batch(self) -> int:
        """The smallest batch (per subset) this configuration can score."""
        return minimum_batch(self.interval)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> MuScConfig:
        """From ``--set``-style options; an unknown key is an error naming it."""
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown MuSc option(s): {', '.join(unknown)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)
