"""Lazy imports of the optional ONNX packages, with one clear message when they are missing."""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = "ONNX export and inference need the optional packages onnx and onnxruntime: pip install mmiad[onnx]"


def require_onnx() -> ModuleType:
    """The ``onnx`` module (used to check exported graphs)."""
    try:
        import onnx
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return onnx


def require_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module (used to run exported graphs)."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return onnxruntime


def cpu_session(path: str) -> object:
    """An onnxruntime CPU session: deterministic, and the only provider every line PC has."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
