"""``manifest.json``: everything a runtime needs besides the graphs themselves.

It records the graphs' names and shapes, the extractor preset and the pipeline configuration (so the Python
side rebuilds the same preprocessing and FPFH/grouping and can refuse a mismatch), the calibrated thresholds and
the model file's full configuration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmiad.methods.modelfile import ModelFileError
from mmiad.postprocess.threshold import Thresholds
from mmiad.utils.atomic import write_json
from mmiad.utils.names import UnsafeNameError, plain_name

MANIFEST = "manifest.json"
FORMAT = "mmiad-onnx"
FORMAT_VERSION = 1


#: The single-modality fallback models of an export (a model file of their banks, config and thresholds), beside
#: the graphs, so that ``mmiad predict --onnx`` scores a sample missing a modality as ``--run`` does.
FALLBACK_FILE = "fallback.safetensors"


@dataclass
class Manifest:
    """Contents of ``manifest.json``.

    Attributes:
        method: Method name (``cfm``).
        opset: ONNX opset of every graph.
        image_size: Model input side S.
        grid_size: Side G of the grid the scorer reads.
        extractors: Extractor preset name.
        pipeline: ``FeaturePipeline.config()`` at export (extractor configs, preprocessing profile).
        graphs: Per graph (``image_extractor``, ``point_extractor``, ``scorer``): file, inputs, outputs.
        thresholds: Calibrated thresholds (``Thresholds.to_dict()``), or None.
        model_config: The model file's configuration (hyperparameters, training facts, category).
        versions: Library versions at export, for bug reports.
    """

    method: str
    opset: int
    image_size: int
    grid_size: int
    extractors: str
    pipeline: dict[str, Any]
    graphs: dict[str, dict[str, Any]]
    thresholds: dict[str, Any] | None
    model_config: dict[str, Any]
    versions: dict[str, str] = field(default_factory=dict)

    def write(self, directory: str | Path) -> Path:
        """Write ``<directory>/manifest.json``."""
        path = Path(directory) / MANIFEST
        write_json(path, {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)})
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Read and check ``<directory>/manifest.json``; a missing graph file is an error here, not at run time."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise ModelFileError(f"{directory}: not an ONNX export (no {MANIFEST}); create one with `mmiad export`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelFileError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ModelFileError(f"{path}: not an mmiad ONNX manifest")
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ModelFileError(f"{path}: manifest format {version} is not supported (expected {FORMAT_VERSION})")
        try:
            manifest = cls(**data)
        except TypeError as error:
            raise ModelFileError(f"{path}: unexpected or missing fields ({error})") from error
        if not isinstance(manifest.graphs, dict) or not isinstance(manifest.model_config, dict):
            raise ModelFileError(f"{path}: fields 'graphs' and 'model_config' must be JSON objects")
        try:
            if "category" in manifest.model_config:
                plain_name(manifest.model_config["category"], source=path)
            for graph in manifest.graphs.values():
                plain_name(graph.get("file") if isinstance(graph, dict) else None, source=path)
        except UnsafeNameError as error:
            raise ModelFileError(str(error)) from error
        if not isinstance(manifest.model_config.get("hparams"), dict):
            raise ModelFileError(f"{path}: field 'model_config.hparams' is missing or not a JSON object")
        if manifest.thresholds is not None:
            try:
                Thresholds.from_dict(manifest.thresholds)
            except ValueError as error:
                raise ModelFileError(f"{path}: field 'thresholds': {error}") from error
        for name, graph in manifest.graphs.items():
            if not (directory / graph["file"]).is_file():
                raise ModelFileError(f"{directory}: graph {name!r} is missing its file {graph['file']}")
        return manifest
