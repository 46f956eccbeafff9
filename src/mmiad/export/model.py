"""Export a trained model (or every model of a run folder) to a folder of ONNX graphs plus a manifest.

Layout of ``mmiad export --run RUN --out DIR``::

    DIR/index.json                       which export folder serves which category (like run.json)
    DIR/<key>/manifest.json              see :mod:`mmiad.export.manifest`
    DIR/<key>/image_extractor.onnx       2D extractor
    DIR/<key>/point_extractor.onnx       Point-MAE encoder (deep presets only; FPFH stays in Python)
    DIR/<key>/scorer.onnx                the method's scoring head
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmiad import __version__
from mmiad.engine import TrainedModel, load_trained, model_for, run_models
from mmiad.engine.runs import read_models_index
from mmiad.export._deps import require_onnx, require_onnxruntime
from mmiad.export.extractors import export_image_extractor, export_point_extractor
from mmiad.export.graphs import OPSET
from mmiad.export.manifest import FALLBACK_FILE, MANIFEST, Manifest
from mmiad.features.pointmae import PointMaeExtractor
from mmiad.methods.modelfile import ModelFileError, save_model_file
from mmiad.utils.atomic import write_json

EXPORT_INDEX = "index.json"


def export_model(trained: TrainedModel, out_dir: str | Path) -> Manifest:
    """Write the graphs and ``manifest.json`` of one fitted model into ``out_dir``.

    The method writes its own scorer (:meth:`~mmiad.methods.base.AnomalyModel.export_scorer`); CFM and Uni-RCM
    have one, memory-bank methods (BTF, M3DM) refuse: they search a bank of millions of rows, which ONNX does
    not express well.
    """
    model = trained.model
    require_onnx()
    out_dir = Path(out_dir)
    pipeline = model.pipeline
    scorer = model.export_scorer(out_dir)
    graphs = {
        "image_extractor": export_image_extractor(pipeline.image_extractor, out_dir, model.config.image_size),
        "scorer": scorer,
    }
    if isinstance(pipeline.point_extractor, PointMaeExtractor):
        graphs["point_extractor"] = export_point_extractor(pipeline.point_extractor, out_dir)
    onnx = require_onnx()
    manifest = Manifest(
        method=model.name,
        opset=OPSET,
        image_size=model.config.image_size,
        grid_size=model.config.grid_size,
        extractors=model.config.extractors,
        pipeline=pipeline.config(),
        graphs=graphs,
        thresholds=trained.thresholds.to_dict() if trained.thresholds is not None else None,
        model_config={**model.get_config(), **trained.info},
        versions={
            "mmiad": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": require_onnxruntime().__version__,
        },
    )
    if trained.fallback is not None:  # ``mmiad predict --onnx`` scores a sample missing a modality as --run does
        thresholds = {m: t.to_dict() for m, t in trained.fallback_thresholds.items()}
        config = {**trained.fallback.config(), "thresholds": thresholds}
        save_model_file(out_dir / FALLBACK_FILE, trained.fallback.state_tensors(), config)
    manifest.write(out_dir)
    return manifest


def export_run(
    run: str | Path, out: str | Path, *, category: str | None = None, cache_dir: str | None = None
) -> dict[str, Path]:
    """Export every model of a run folder (or only the one serving ``category``) under ``out``.

    Returns:
        Export folder per model key (category or ``unified``).
    """
    models = run_models(run)
    if category is not None:
        path = model_for(models, category)
        models = {key: p for key, p in models.items() if p == path}
    out = Path(out)
    folders: dict[str, Path] = {}
    for key, path in models.items():
        trained = load_trained(path, cache_dir=cache_dir, device="cpu")  # traced on the CPU: portable graphs
        export_model(trained, out / key)
        folders[key] = out / key
    index_path = out / EXPORT_INDEX
    index = {"models": read_export_index(out)} if index_path.is_file() else {"models": {}}
    index["models"].update({key: folder.name for key, folder in folders.items()})
    write_json(index_path, index)
    return folders


def read_export_index(path: Path) -> dict[str, str]:
    """``index.json`` of an export: model key → folder name, both checked to be plain names.

    Raises:
        ModelFileError: naming the file (malformed JSON, no ``models``, a name that is not a plain name).
    """
    return dict(read_models_index(path / EXPORT_INDEX, "folder name")["models"])


def resolve_export(path: str | Path, category: str | None = None) -> Path:
    """The model export folder to use: ``path`` itself, or the one serving ``category`` in an export of a run."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if not (path / EXPORT_INDEX).is_file():
        raise ModelFileError(f"{path}: not an ONNX export (no {MANIFEST} or {EXPORT_INDEX}); use `mmiad export`")
    models = {key: path / name for key, name in read_export_index(path).items()}
    if category is None:
        if len(models) != 1:
            raise ValueError(f"the export has several models ({', '.join(sorted(models))}); choose one with --category")
        return next(iter(models.values()))
    return model_for(models, category)
