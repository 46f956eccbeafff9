"""Run folders: training one model per category (or a unified one), extending it, and finding its models."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.formats import DatasetFormat, open_dataset
from mmiad.data.sample import SampleRecord
from mmiad.engine.scoring import score_records
from mmiad.engine.trained import build_model, fit_and_calibrate, fit_fallback, load_trained, save_trained
from mmiad.methods.base import AnomalyModel
from mmiad.methods.modelfile import ModelFileError
from mmiad.postprocess.threshold import calibrate
from mmiad.utils import distributed as ddp
from mmiad.utils.atomic import write_json
from mmiad.utils.compute import describe_device
from mmiad.utils.names import UnsafeNameError, plain_name

RUN_INDEX = "run.json"
UNIFIED = "unified"
Log = Callable[[str], None]


def quiet(_: str) -> None:
    """The default :data:`Log`: say nothing (the CLI passes a printer)."""
    return None


#: ``--shot-selection``: ``random`` draws with ``--seed`` (the default), ``first`` takes the first K files in sorted
#: order (CIF's protocol). The draw depends only on the category's training files, K, the rule and the seed, never
#: on the method, so every method of a few-shot comparison sees the same samples.
SHOT_SELECTIONS = ("random", "first")


def select_few_shot(
    records: Sequence[SampleRecord], shots: int, seed: int, selection: str = "random"
) -> tuple[list[SampleRecord], list[int]]:
    """K nominal samples and their indices in ``records`` (ascending); the run records both.

    ``random``: drawn without replacement by ``numpy.random.default_rng(seed)``. ``first``: the first K by RGB
    path (sorted), whatever order the dataset listed them in. K beyond the records keeps them all.
    """
    if shots <= 0:
        raise ValueError(f"--shots must be positive, got {shots}")
    if selection not in SHOT_SELECTIONS:
        raise ValueError(f"unknown shot selection {selection!r}; expected one of {', '.join(SHOT_SELECTIONS)}")
    if shots >= len(records):
        return list(records), list(range(len(records)))
    if selection == "first":
        by_path = sorted(range(len(records)), key=lambda i: (str(records[i].rgb_path), str(records[i].xyz_path)))
        indices = sorted(by_path[:shots])
    else:
        indices = sorted(np.random.default_rng(seed).choice(len(records), size=shots, replace=False).tolist())
    return [records[i] for i in indices], indices


def few_shot_record(
    train: Sequence[SampleRecord], indices: Sequence[int], shots: int, seed: int, selection: str, root: Path
) -> dict[str, Any]:
    """What a run records of a draw: K, the rule, the seed, the indices and the files (relative to the root)."""

    def relative(path: Any) -> str | None:
        if path is None:
            return None
        try:
            return Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return str(path)

    return {
        "shots": shots,
        "selection": selection,
        "seed": seed if selection == "random" else None,
        "indices": list(indices),
        "stems": [r.stem for r in train],
        "files": [relative(r.rgb_path) for r in train],
        "xyz_files": [relative(r.xyz_path) for r in train],
    }


def calibration_split(
    dataset: DatasetFormat, category: str, train: list[SampleRecord], errors: list[DataError]
) -> tuple[list[SampleRecord], list[SampleRecord], str]:
    """(training records, calibration records, source): the validation split, else a held-out tenth of train."""
    validation = dataset.records(category, "validation", errors=errors)
    if validation:
        return train, validation, "validation"
    if len(train) >= 5:
        held_out = max(1, len(train) // 10)
        return train[:-held_out], train[-held_out:], "train-holdout"
    return train, train, "train (no held-out nominal samples; thresholds are optimistic)"


def _category_splits(
    dataset: DatasetFormat,
    names: Sequence[str],
    shots: int | None,
    seed: int,
    errors: list[DataError],
    selection: str = "random",
) -> dict[str, tuple[list[SampleRecord], list[SampleRecord], str, dict[str, Any]]]:
    """Per category: (training records, calibration records, calibration source, facts for the model file)."""
    splits = {}
    for category in names:
        train = dataset.records(category, "train", errors=errors)
        if not train:
            raise DataError(dataset.root / category, f"no training samples found ({dataset.name} layout)")
        train, calibration, source = calibration_split(dataset, category, train, errors)
        info: dict[str, Any] = {}
        if shots:
            train, indices = select_few_shot(train, shots, seed, selection)
            info["few_shot"] = few_shot_record(train, indices, shots, seed, selection, dataset.root)
        splits[category] = (train, calibration, source, info)
    return splits


def train_run(
    method: str,
    data_root: str | Path,
    out: str | Path,
    *,
    categories: Sequence[str] | None = None,
    unified: bool = False,
    shots: int | None = None,
    seed: int = 0,
    max_fpr: float = 0.01,
    hparams: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    fallback: bool = True,
    format: str | None = None,
    progress: bool = False,
    log: Log = quiet,
    shot_selection: str = "random",
) -> tuple[dict[str, Path], list[DataError]]:
    """Train one model per category (or one ``unified`` model on all of them) and write the run folder.

    With ``shots`` K, each category trains on K nominal samples chosen by ``shot_selection`` (see
    :func:`select_few_shot`; the same for every method); the model files and ``run.json`` record which files.

    A unified model sees the union of the categories' nominal samples with no category label, as Uni-RCM's
    multi-class setting; its thresholds are calibrated on the union of the held-out nominal samples.

    ``format`` names the dataset layout (:mod:`mmiad.data.formats`); by default it is detected from the root.

    Returns:
        (model file per category key, the bad samples that were skipped).
    """
    dataset = open_dataset(data_root, format)
    root, out = dataset.root, Path(out)
    names = [plain_name(c, source="--categories") for c in categories] if categories else dataset.categories()
    if not names:
        raise DataError(root, f"no category found ({dataset.name} layout)")
    errors: list[DataError] = []
    prototype = build_model(method, cache_dir, hparams)  # fail on a bad option before any work
    if not prototype.needs_training:
        raise ValueError(f"method {method!r} needs no training; score a dataset with `mmiad test --method {method}`")
    compute = compute_record(prototype)  # an absent --device fails here, before any work
    distributed = ddp.init_from_env()
    if shot_selection not in SHOT_SELECTIONS:
        raise ValueError(f"unknown shot selection {shot_selection!r}; expected one of {', '.join(SHOT_SELECTIONS)}")
    splits = _category_splits(dataset, names, shots, seed, errors, shot_selection)
    groups = {UNIFIED: names} if unified else {category: [category] for category in names}
    # What per-category models share is trained once on all categories (M3DM's UFF); most methods share nothing.
    shared = None
    if not unified:
        shared = prototype.fit_shared({c: splits[c][0] for c in names}, progress=progress, errors=errors)
        if shared is not None:
            log(f"trained the part of {method} shared by {len(names)} categories")
    files: dict[str, Path] = {}
    for key, members in groups.items():
        train = [r for c in members for r in splits[c][0]]
        calibration = [r for c in members for r in splits[c][1]]
        sources = sorted({splits[c][2] for c in members})
        info: dict[str, Any] = {"data_root": str(root.resolve()), "data_format": dataset.name}
        info.update({"categories": members} if unified else {"category": key, **splits[key][3]})
        if unified and shots:
            info["few_shot"] = {c: splits[c][3]["few_shot"] for c in members}
        log(f"[{key}] training {method} on {len(train)} nominal samples")
        model = build_model(method, cache_dir, hparams)
        info.update(compute_record(model))
        if shared is not None:
            model.use_shared(shared)
        trained = fit_and_calibrate(
            model,
            train,
            calibration,
            max_fpr=max_fpr,
            source=", ".join(sources),
            progress=progress,
            errors=errors,
            with_fallback=fallback,
        )
        trained.info = info
        files[key] = out / f"{key}.safetensors"
        if ddp.is_main_process():
            save_trained(files[key], trained)
            threshold = trained.thresholds.image if trained.thresholds else float("nan")
            log(f"[{key}] saved {files[key]} (image threshold {threshold:.4g} from {', '.join(sources)})")
    if ddp.is_main_process():
        draws = {c: splits[c][3]["few_shot"] for c in names} if shots else None
        write_run_index(out, method, unified, names, files, compute=compute, few_shot=draws)
    if distributed:
        ddp.barrier()
    return files, errors


def compute_record(model: AnomalyModel) -> dict[str, str]:
    """Where and in which precision a model was trained, for the run's records (never needed to load it)."""
    return {"trained_on": describe_device(model.device), "precision": model.config.precision}


def write_run_index(
    out: Path,
    method: str,
    unified: bool,
    categories: Sequence[str],
    files: dict[str, Path],
    compute: dict[str, str] | None = None,
    few_shot: dict[str, Any] | None = None,
) -> None:
    """``run.json``: which model file serves which category (and where it was trained: informative only), and
    for a few-shot run the files each category was trained on."""
    index = {
        "method": method,
        "unified": unified,
        "categories": list(categories),
        "models": {k: v.name for k, v in files.items()},
        **(compute or {}),
    }
    if few_shot:
        index["few_shot"] = few_shot
    write_json(out / RUN_INDEX, index)


def extend_run(
    run: str | Path,
    data_root: str | Path,
    new_categories: Sequence[str],
    *,
    epochs: int,
    max_fpr: float = 0.01,
    cache_dir: str | None = None,
    format: str | None = None,
    progress: bool = False,
    log: Log = quiet,
    replay: bool = True,
) -> tuple[Path, list[DataError]]:
    """Add categories to a trained unified model in place (``mmiad train --resume RUN --add-categories ...``).

    The method extends what it learned (Uni-RCM: new ORQ codes, fine-tuning with replay of the earlier
    categories' training samples, whose features come from the feature cache) and the thresholds are
    recalibrated on the held-out nominal samples of all categories. ``replay=False`` hands the method no earlier
    training sample (the incremental protocol's rule: a step trains on the new classes only).
    """
    dataset, run = open_dataset(data_root, format), Path(run)
    models = run_models(run)
    if UNIFIED not in models:
        raise ModelFileError(f"{run}: --add-categories needs a unified run (train it with --unified)")
    trained = load_trained(models[UNIFIED], cache_dir=cache_dir)
    extend = getattr(trained.model, "extend", None)
    if extend is None:
        raise ValueError(f"method {trained.model.name!r} cannot add categories to a trained model; retrain it")
    known = list(trained.info.get("categories", []))
    added = [plain_name(c, source="--add-categories") for c in new_categories if c not in known]
    if not added:
        raise ValueError(f"nothing to add: the model already serves {', '.join(known)}")
    errors: list[DataError] = []
    splits = _category_splits(dataset, [*known, *added], None, 0, errors)
    new = [r for c in added for r in splits[c][0]]
    earlier = [r for c in known for r in splits[c][0]]
    replayed = earlier if replay else []
    log(f"[unified] adding {', '.join(added)} ({len(new)} samples) with {len(replayed)} replayed samples")
    extend(new, replayed, epochs=epochs, progress=progress, errors=errors)
    calibration = [r for c in [*known, *added] for r in splits[c][1]]
    held_out = list(score_records(trained.model, calibration, progress=progress, errors=errors))
    thresholds = calibrate(
        [p.pred_score for p in held_out], [p.anomaly_map for p in held_out], max_fpr, "validation (after extend)"
    )
    trained.thresholds = thresholds
    trained.info = {**trained.info, "categories": [*known, *added]}
    if trained.fallback is not None:
        fit_fallback(
            trained, [*earlier, *new], calibration, max_fpr=max_fpr, source="validation (after extend)", errors=errors
        )
    path = save_trained(models[UNIFIED], trained)
    index = read_run_index(run)
    write_run_index(run, str(index.get("method", trained.model.name)), True, [*known, *added], {UNIFIED: path})
    return path, errors


def read_run_index(run: str | Path) -> dict[str, Any]:
    """``run.json`` of a run folder, checked: a JSON object whose model files and categories are plain names.

    Raises:
        ModelFileError: naming ``run.json`` and the field at fault (malformed JSON, no ``models``, a model name
            such as ``../../x`` that would point outside the run folder).
    """
    run = Path(run)
    index_path = run / RUN_INDEX
    if not index_path.is_file():
        raise ModelFileError(f"{run}: not a run folder (no {RUN_INDEX}); train one with `mmiad train`")
    index = read_models_index(index_path, "file name")
    if not index["models"]:
        raise ModelFileError(f"{index_path}: field 'models' is missing or empty (expected {{category: file name}})")
    categories = index.get("categories") or []
    if not isinstance(categories, list):
        raise ModelFileError(f"{index_path}: field 'categories' must be a list of names")
    try:
        for category in categories:
            plain_name(category, source=index_path)
    except UnsafeNameError as error:
        raise ModelFileError(str(error)) from error
    return index


def read_models_index(index_path: Path, entry: str) -> dict[str, Any]:
    """An index file mapping model keys to files or folders (``run.json``, an export's ``index.json``), checked:
    a JSON object whose ``models`` maps plain names to plain names, so no entry can point outside its folder.

    Args:
        index_path: The index file.
        entry: What a value names (``file name``, ``folder name``), for the error message.

    Raises:
        ModelFileError: naming the file and the field at fault.
    """
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{index_path}: not valid JSON ({error})") from error
    if not isinstance(index, dict):
        raise ModelFileError(f"{index_path}: expected a JSON object, got {type(index).__name__}")
    models = index.get("models")
    if not isinstance(models, dict):
        raise ModelFileError(f"{index_path}: field 'models' is missing (expected {{category: {entry}}})")
    try:
        for key, name in models.items():
            plain_name(key, source=index_path)
            plain_name(name, source=index_path)
    except UnsafeNameError as error:
        raise ModelFileError(str(error)) from error
    return index


def run_models(run: str | Path) -> dict[str, Path]:
    """Model file per category key of a run folder (``unified`` for a model of all categories)."""
    run = Path(run)
    return {key: run / name for key, name in read_run_index(run)["models"].items()}


def served_categories(run: str | Path, dataset: DatasetFormat, requested: Sequence[str] | None = None) -> list[str]:
    """The categories to test a run on: ``requested`` as given, else the dataset's categories the run was trained on.

    A unified model can score any category, but by default it is only tested on those it learnt: an unseen product
    is a different question (and averaging it in would hide how well the model does on its own categories).
    """
    if requested:
        return list(requested)
    models = run_models(run)
    index = read_run_index(run)
    trained = set(index.get("categories") or [k for k in models if k != UNIFIED])
    return [c for c in dataset.categories() if c in trained or (UNIFIED in models and not trained)]


def serving_key(keys: Collection[str], category: str) -> str:
    """The key of the model that serves ``category``: its own, or the unified one.

    Raises:
        ModelFileError: when neither exists.
    """
    if category in keys:
        return category
    if UNIFIED in keys:
        return UNIFIED
    raise ModelFileError(f"the run has no model for category {category!r}; it has: {', '.join(sorted(keys))}")


def model_for(models: dict[str, Path], category: str) -> Path:
    """The model file (or export folder) that serves ``category``."""
    return models[serving_key(models, category)]
