"""Released trained models as mmiad runs (``mmiad import``): the authors' files, our run folder.

An imported run is a normal run (``run.json`` + one model file per model, as ``mmiad train`` writes), so ``test``,
``predict``, ``report`` and ``export`` work on it. Only the learned weights come from the release; with a dataset
(``data_root``) the thresholds and the single-modality fallback are calibrated exactly as training does it, and
without one the run has no thresholds (``predict`` then reports scores and maps without labels).

* CFM: one model per category, from the per-class ``CFM_2Dto3D_*`` / ``CFM_3Dto2D_*`` pairs.
* CMDR-IAD: one model per category, from the four per-class ``{map2Dto3D,map3Dto2D,Dec2D,Dec3D}_*`` files.
* Uni-RCM: one unified model (+ its ORQ codebooks).
* M3DM: the release is the UFF checkpoint only; memory banks and decision fusion are built from the training
  data as in the official code, so a dataset is required.
* G2SF: the release is, per class, the LSPN + ``score_mean.npy`` + ``global_scale.npy``; the banks are built from
  the training data, so a dataset is required.
* GLFM: the release is the adapted Point-MAE only (``pointmae_adapted.pth``); the prototypes and local memories
  are built from the training data of every category (one unified model), so a dataset is required.

The run folder is built next to ``out`` and renamed into place at the end, so a failed import leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmiad.data.errors import DataError
from mmiad.data.formats import DatasetFormat, open_dataset
from mmiad.engine.runs import UNIFIED, Log, _category_splits, quiet, train_run, write_run_index
from mmiad.engine.trained import TrainedModel, build_model, calibrate_model, save_trained
from mmiad.methods.base import AnomalyModel
from mmiad.methods.official import OfficialImport
from mmiad.methods.registry import available_methods, get_method

#: The released models were all trained on DINO ViT-B/8 + Point-MAE features (GLFM: Point-MAE blocks 0-1 only).
DEFAULT_EXTRACTORS = "dino-pointmae"
METHOD_EXTRACTORS = {"glfm": "glfm"}


@dataclass
class _Job:
    """The options every importer shares (see :func:`import_run`)."""

    data_root: str | Path | None
    dataset: DatasetFormat | None
    categories: Sequence[str] | None
    max_fpr: float
    hparams: dict[str, Any]
    cache_dir: str | None
    fallback: bool
    progress: bool
    log: Log


def import_run(
    method: str,
    source: str | Path,
    out: str | Path,
    *,
    orq: str | Path | None = None,
    data_root: str | Path | None = None,
    categories: Sequence[str] | None = None,
    max_fpr: float = 0.01,
    hparams: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    fallback: bool = True,
    format: str | None = None,
    progress: bool = False,
    log: Log = quiet,
) -> tuple[dict[str, Path], list[DataError]]:
    """Write the run folder ``out`` from released files at ``source``.

    Args:
        method: A registered method that declares ``importable`` (see ``mmiad import --help``).
        source: The released file, or a folder holding them (searched recursively).
        out: The run folder to create (must not exist, or be empty).
        orq: Uni-RCM only: the ORQ file, when it is not inside ``source``.
        data_root: Dataset to calibrate thresholds on (required for M3DM, whose banks are built from it).
        categories: Subset of categories (CFM: of the released classes; Uni-RCM and M3DM: of the dataset's).
        max_fpr: False-alarm rate the thresholds allow, as in training.
        hparams: Other hyperparameters (extractors default to ``dino-pointmae``; ``weights_dir``, ``random_init``,
            ``compat``, ...). Sizes the files fix (hidden size, grid, codebooks) cannot be overridden.
        cache_dir: Feature cache.
        fallback: Also fit the single-modality fallback models (needs ``data_root``), as training does.
        format: Layout of ``data_root`` (detected by default).

    Returns:
        (model file per category key, bad samples skipped while calibrating).
    """
    if not get_method(method).importable:
        importable = ", ".join(m for m in available_methods() if get_method(m).importable)
        raise ValueError(f"mmiad import supports --method {importable}, not {method!r}")
    if orq is not None and method != "unircm":
        raise ValueError("--orq goes with --method unircm only")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; import into a new run folder")
    hparams = {"extractors": METHOD_EXTRACTORS.get(method, DEFAULT_EXTRACTORS), **(hparams or {})}
    dataset = open_dataset(data_root, format) if data_root is not None else None  # before anything is written
    job = _Job(data_root, dataset, categories, max_fpr, hparams, cache_dir, fallback, progress, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        if method == "m3dm":
            files, errors = _import_m3dm(Path(source), temp, job)
        elif method == "g2sf":
            files, errors = _import_g2sf(Path(source), temp, job)
        elif method == "glfm":
            files, errors = _import_glfm(Path(source), temp, job)
        else:
            files, errors = _import_networks(method, Path(source), orq, temp, job)
        # mkdtemp makes the folder 0700; a run folder follows the umask like the ones `mmiad train` creates.
        os.chmod(temp, 0o777 & ~_umask())
        if out.exists():
            out.rmdir()
        os.replace(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return {key: out / path.name for key, path in files.items()}, errors


def _umask() -> int:
    """The process umask (read by setting it, then restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _import_m3dm(source: Path, temp: Path, job: _Job) -> tuple[dict[str, Path], list[DataError]]:
    """Per category: UFF from the release, banks + DLF from the data (the official ``fusion_module_path`` use)."""
    from mmiad.methods.m3dm.official import uff_state

    if job.data_root is None:
        raise ValueError(
            "--method m3dm needs --data ROOT: a released M3DM is only its UFF weights; the memory banks and the "
            "decision-fusion SVMs are built from the training samples"
        )
    if not source.is_file():
        raise DataError(source, "give the UFF checkpoint file itself (fusion_pretrain.py's checkpoint-<E>.pth)")
    if job.hparams.get("use_uff") is False:
        raise ValueError("use_uff=false contradicts importing a UFF checkpoint")
    uff_state(source)  # a wrong file fails here, before any feature is extracted
    job.log(f"importing M3DM's UFF from {source}; building memory banks from {job.data_root}")
    return _train_from_data("m3dm", temp, job, {"uff_checkpoint": str(source.resolve())})


def _import_g2sf(source: Path, temp: Path, job: _Job) -> tuple[dict[str, Path], list[DataError]]:
    """Per category: LSPN, μ and θ from the release folder, banks from the data (official ``--load_fuser``)."""
    if job.data_root is None:
        raise ValueError("--method g2sf needs --data ROOT: the memory banks are built from the training samples")
    if not source.is_dir():
        raise DataError(source, "give the release folder holding <class>/fusion/MMScoringTrainerV2.pth")
    job.log(f"importing G2SF's fusion networks from {source}; building memory banks from {job.data_root}")
    return _train_from_data("g2sf", temp, job, {"official_fusion": str(source.resolve())})


def _import_glfm(source: Path, temp: Path, job: _Job) -> tuple[dict[str, Path], list[DataError]]:
    """One unified model: the released adapted extractor, the memories built from every category's data."""
    if job.data_root is None:
        raise ValueError(
            "--method glfm needs --data ROOT: a released GLFM is only its adapted Point-MAE; the prototypes and "
            "local memories are built from the training samples"
        )
    if not source.is_file():
        raise DataError(source, "give the adapted checkpoint file itself (pointmae_adapted.pth)")
    job.log(f"importing GLFM's adapted Point-MAE from {source}; building the memories from {job.data_root}")
    return _train_from_data(
        "glfm", temp, job, {"adaptation": "released", "adapted_checkpoint": str(source.resolve())}, unified=True
    )


def _train_from_data(
    method: str, temp: Path, job: _Job, released: dict[str, Any], *, unified: bool = False
) -> tuple[dict[str, Path], list[DataError]]:
    """A training run on ``job``'s data whose released part comes from ``released`` hyperparameters (the files to
    load instead of training that part), written into ``temp``."""
    assert job.data_root is not None
    return train_run(
        method,
        job.data_root,
        temp,
        categories=job.categories,
        unified=unified,
        max_fpr=job.max_fpr,
        hparams={**job.hparams, **released},
        cache_dir=job.cache_dir,
        fallback=job.fallback,
        format=job.dataset.name if job.dataset is not None else None,
        progress=job.progress,
        log=job.log,
    )


def _import_networks(
    method: str, source: Path, orq: str | Path | None, temp: Path, job: _Job
) -> tuple[dict[str, Path], list[DataError]]:
    """CFM or CMDR-IAD (one model per released class) or Uni-RCM (one unified model): weights from files,
    thresholds from data."""
    if method in ("cfm", "cmdr"):
        from mmiad.methods.cfm.official import find_cfm_checkpoints, import_cfm_pair
        from mmiad.methods.cmdr.official import find_cmdr_checkpoints, import_cmdr_set

        finder, importer = (
            (find_cfm_checkpoints, import_cfm_pair) if method == "cfm" else (find_cmdr_checkpoints, import_cmdr_set)
        )
        pairs = finder(source)
        if job.categories:
            unknown = [c for c in job.categories if c not in pairs]
            if unknown:
                raise ValueError(f"no released {method} files for {', '.join(unknown)}; found: {', '.join(pairs)}")
            pairs = {c: pairs[c] for c in job.categories}
        imports = {name: importer(paths) for name, paths in pairs.items()}
        members = {name: [name] for name in imports}
    else:
        from mmiad.methods.unircm.official import import_unircm

        imports = {UNIFIED: import_unircm(source, orq)}
        served = list(job.categories or (job.dataset.categories() if job.dataset is not None else []))
        members = {UNIFIED: served}
    splits = {}
    errors: list[DataError] = []
    if job.dataset is not None:
        wanted = sorted({c for names in members.values() for c in names})
        if not wanted:
            raise DataError(job.dataset.root, f"no category found ({job.dataset.name} layout)")
        splits = _category_splits(job.dataset, wanted, None, 0, errors)
    files: dict[str, Path] = {}
    for key, imported in imports.items():
        model = _build(method, imported, job.hparams, job.cache_dir)
        info: dict[str, Any] = {"imported": {"method": method, "sources": imported.sources, **imported.facts}}
        info.update({"categories": members[key]} if key == UNIFIED else {"category": key})
        if job.data_root is None:
            trained = TrainedModel(model, None)
            job.log(f"[{key}] imported {', '.join(s['file'] for s in imported.sources)} (no --data: no thresholds)")
        else:
            train = [r for c in members[key] for r in splits[c][0]]
            calibration = [r for c in members[key] for r in splits[c][1]]
            source_names = ", ".join(sorted({splits[c][2] for c in members[key]}))
            trained = calibrate_model(
                model,
                train,
                calibration,
                max_fpr=job.max_fpr,
                source=source_names,
                progress=job.progress,
                errors=errors,
                with_fallback=job.fallback,
            )
            info["data_root"] = str(Path(job.data_root).resolve())
            assert trained.thresholds is not None
            job.log(f"[{key}] imported; image threshold {trained.thresholds.image:.4g} from {source_names}")
        trained.info = info
        files[key] = save_trained(temp / f"{key}.safetensors", trained)
    index_categories = members[UNIFIED] if method == "unircm" else list(members)
    write_run_index(temp, method, method == "unircm", index_categories, files)
    return files, errors


def _build(method: str, imported: OfficialImport, hparams: dict[str, Any], cache_dir: str | None) -> AnomalyModel:
    """The fitted mmiad model: the files' tensors under the user's other hyperparameters, extractors checked."""
    clashes = [
        f"{k}={hparams[k]!r} (the file has {v!r})"
        for k, v in imported.hparams.items()
        if k in hparams and hparams[k] != v
    ]
    if clashes:
        raise ValueError(f"these options contradict the released files: {', '.join(clashes)}")
    merged = {**hparams, **imported.hparams}
    build_model(method, cache_dir, merged)  # an unknown option is a clear error
    config = {"hparams": merged, "channels": list(imported.channels)}
    model = get_method(method).from_state(config, imported.tensors, cache_dir=cache_dir)
    pipeline = model.pipeline
    have = (pipeline.image_extractor.out_channels, pipeline.point_extractor.out_channels)
    if tuple(have) != tuple(imported.channels):
        raise ValueError(
            f"the released model takes {imported.channels[0]}-channel 2D and {imported.channels[1]}-channel 3D "
            f"features, but the {merged['extractors']!r} extractors give {have[0]} and {have[1]}; use the "
            f"extractors it was trained with (the authors used {DEFAULT_EXTRACTORS})"
        )
    return model
