"""mmiad: unsupervised multimodal (RGB + 3D point cloud) industrial anomaly detection.

The public API is what this module exports (``__all__``); everything else may change between versions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BTF",
    "CFM",
    "M3DM",
    "CategoryMetrics",
    "DataError",
    "Metrics",
    "Prediction",
    "Run",
    "UniRCM",
    "__version__",
    "evaluate",
    "generate_dataset",
    "predict",
    "train",
]

# Imported on first use so that `import mmiad` (and `mmiad --help`) stays fast.
_LAZY = {
    "train": "mmiad.api",
    "evaluate": "mmiad.api",
    "predict": "mmiad.api",
    "Run": "mmiad.api",
    "Metrics": "mmiad.api",
    "CategoryMetrics": "mmiad.api",
    "Prediction": "mmiad.methods.base",
    "DataError": "mmiad.data.errors",
    "generate_dataset": "mmiad.data.synthetic",
}

if TYPE_CHECKING:
    from mmiad.api import CategoryMetrics, Metrics, Run, evaluate, predict, train
    from mmiad.data.errors import DataError
    from mmiad.data.synthetic import generate_dataset
    from mmiad.methods.base import Prediction
    from mmiad.methods.btf import BTF
    from mmiad.methods.cfm import CFM
    from mmiad.methods.m3dm import M3DM
    from mmiad.methods.unircm import UniRCM


def __getattr__(name: str) -> Any:
    """Public names on first use; every registered method class is one (``mmiad.CFM``), built-in or not."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    importlib.import_module("mmiad.methods")
    from mmiad.methods.registry import method_by_class_name

    method = method_by_class_name(name)
    if method is not None:
        return method
    raise AttributeError(f"module 'mmiad' has no attribute {name!r}")
