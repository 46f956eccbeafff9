"""RAD's settings: the official MVTec AD values by default, the other datasets' as named presets.

The official code (longkukuhi/RAD at 59847f4) runs DINOv3 ViT-B/16 at 448²; mmiad runs DINO ViT-B/8 at 224² (the
``dino-rad`` extractors: the same 28×28 grid), a substitution. The 3D branch (``modality`` ``2d+3d`` or ``3d``) is
mmiad's own extension: RAD is RGB-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mmiad.methods.settings import MethodSettings

MODALITIES = ("2d", "2d+3d", "3d")
FUSIONS = ("product", "sum")
MEMORY_DTYPES = ("float16", "float32")

#: The README's per-dataset settings (k_image, pos_radius); every published run is positional, max_ratio 0.01.
DATASET_SETTINGS: dict[str, dict[str, int]] = {
    "mvtec_ad": {"k_image": 150, "pos_radius": 1},
    "visa": {"k_image": 900, "pos_radius": 2},
    "real_iad": {"k_image": 900, "pos_radius": 0},
    "3d_adam": {"k_image": 48, "pos_radius": 1},
}


@dataclass
class RADConfig(MethodSettings):
    """RAD hyperparameters (official values; ``--set dataset=visa`` applies another dataset's README settings).

    The pipeline fields are :class:`~mmiad.methods.settings.MethodSettings`'. The official features are the
    ``dino-rad`` extractors (DINO ViT-B/8 blocks 3/6/9/11 + block-11 CLS, standing in for DINOv3 ViT-B/16, which
    mmiad cannot load); with any other 2D extractor its single map is the one level and the mean of that map
    stands in for the CLS token (mmiad's, so the weight-free extractors run RAD end to end).

    Attributes:
        k_image: Training images retrieved per test image by CLS cosine (official 150 on MVTec AD); clamped to the
            memory's size.
        pos_radius: ρ of the (2ρ+1)² window, clipped at the border (official 1 on MVTec AD).
        positional: Match within the window (every published run); False matches against every retrieved patch.
        layer_weights: Weights of the levels' scores (None: equal, official); renormalised to sum 1.
        max_ratio: The image score is the mean of the top ``max_ratio`` of the map's pixels (official 0.01; 0:
            the maximum).
        map_size: Side the map is upsampled to before the 5×5 σ=1 Gaussian and the score (official 256); the
            returned map is then resized to ``image_size``.
        sigma: σ of the 5×5 Gaussian, in ``map_size`` pixels (official 1.0).
        dataset: A key of :data:`DATASET_SETTINGS` to take ``k_image`` and ``pos_radius`` from (None: the fields).
        memory_dtype: ``float16`` (default: half the memory; cosines move by ~1e-3) or ``float32`` (the official
            code's precision).
        memory_budget_gb: RAM the memory may take while it is built; images past it spill to memory-mapped files
            under the cache folder.
        modality: ``2d`` (official, RGB only), or mmiad's extension: ``2d+3d`` (the same retrieved images'
            3D features matched in the same window, the maps fused) or ``3d`` (3D maps only; retrieval still by
            the RGB CLS).
        fusion: How ``2d+3d`` combines the two patch maps: ``product`` or ``sum``.
        center: Subtract the memory's per-channel mean from every token (test and memory) before the cosine.
            None (auto): off for the ``dino_vitb8_rad`` tokens (RAD's own cosine of LayerNorm'd tokens), on for
            other extractors and for the 3D tokens: mmiad's choice, because the weight-free descriptors (texture,
            FPFH histograms) are non-negative, so their cosines all sit near 1 and a darker stain, a scaled copy
            of the colour, would be invisible to an uncentred cosine.
        seed: Unused: nothing in RAD is random. Accepted so that ``--seed``, which also seeds the few-shot draw,
            applies to every method alike.
    """

    k_image: int = 150
    pos_radius: int = 1
    positional: bool = True
    layer_weights: tuple[float, ...] | None = None
    max_ratio: float = 0.01
    map_size: int = 256
    sigma: float = 1.0
    dataset: str | None = None
    memory_dtype: str = "float16"
    memory_budget_gb: float = 4.0
    modality: str = "2d"
    fusion: str = "product"
    center: bool | None = None
    seed: int = 0

    paper_extractors: ClassVar[str] = "dino-rad"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_weights is not None:
            self.layer_weights = tuple(float(w) for w in self.layer_weights)
        if self.dataset is not None and self.dataset not in DATASET_SETTINGS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {sorted(DATASET_SETTINGS)}")
        if self.k_image < 1 or self.pos_radius < 0 or self.map_size < 1 or self.sigma < 0:
            raise ValueError("need k_image >= 1, pos_radius >= 0, map_size >= 1 and sigma >= 0")
        if not 0 <= self.max_ratio <= 1:
            raise ValueError(f"max_ratio must be in [0, 1], got {self.max_ratio}")
        if self.memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"unknown memory_dtype {self.memory_dtype!r}; expected one of {MEMORY_DTYPES}")
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; expected one of {FUSIONS}")
        if self.memory_budget_gb < 0:
            raise ValueError("memory_budget_gb must be >= 0")
        if self.layer_weights is not None and (any(w < 0 for w in self.layer_weights) or sum(self.layer_weights) <= 0):
            raise ValueError(f"layer_weights must be non-negative with a positive sum, got {self.layer_weights}")

    def retrieval(self) -> tuple[int, int]:
        """(k_image, pos_radius) in effect: the ``dataset`` preset's, else the fields'."""
        if self.dataset is not None:
            chosen = DATASET_SETTINGS[self.dataset]
            return chosen["k_image"], chosen["pos_radius"]
        return self.k_image, self.pos_radius

    def compat_values(self) -> dict[str, Any]:
        """The official code keeps its memory in float32."""
        return {"memory_dtype": "float32"}
