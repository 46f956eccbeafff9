"""mmiad's embedded default data: a synthetic multimodal dataset in the MVTec 3D-AD layout.

Objects of a few categories (:data:`CATEGORIES`) stand on a background plane under a virtual pinhole camera;
the generator writes RGB images, organized point clouds in metres and ground-truth masks for geometric, colour,
combined and cross-modal defects (:data:`DEFECT_TYPES`). ``generate_dataset(out, "tiny")`` makes a dataset for
unit tests in about a second; ``"demo"`` makes one big enough to compare methods.
"""

from __future__ import annotations

from mmiad.data.synthetic.defects import DEFECT_KINDS, DEFECT_TYPES
from mmiad.data.synthetic.generator import PRESETS, SynthConfig, generate_dataset, generate_sample, resolve_config
from mmiad.data.synthetic.shapes import CATEGORIES

__all__ = [
    "CATEGORIES",
    "DEFECT_KINDS",
    "DEFECT_TYPES",
    "PRESETS",
    "SynthConfig",
    "generate_dataset",
    "generate_sample",
    "resolve_config",
]
