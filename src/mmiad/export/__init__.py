"""Export trained models to ONNX for deployment, and run the exported graphs with onnxruntime.

The dense, heavy parts (the 2D extractor, Point-MAE's encoder, CFM's mapping + scoring) become ONNX graphs; the
data-dependent parts (preprocessing, FPFH, point grouping, the 3D→grid projection) stay in Python. ``onnx`` and
``onnxruntime`` are optional (``pip install mmiad[onnx]``) and imported only when an export or a prediction runs.
"""

from mmiad.export.manifest import MANIFEST, Manifest
from mmiad.export.model import export_model, export_run
from mmiad.export.runtime import OnnxPredictor, predict_with_onnx

__all__ = ["MANIFEST", "Manifest", "OnnxPredictor", "export_model", "export_run", "predict_with_onnx"]
