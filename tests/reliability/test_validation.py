"""Validation on load: edited model files, run indexes and cache entries fail with one line, or are rebuilt."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmiad.engine import load_trained, run_models
from mmiad.methods.modelfile import ModelFileError, load_model_file, save_model_file

Config = dict
Tensors = dict[str, torch.Tensor]


def _tampered(run: Path, tmp_path: Path, edit: Callable[[Config, Tensors], None]) -> Path:
    """A copy of the run's model file with ``edit`` applied to its config and tensors."""
    tensors, config = load_model_file(run / "puck.safetensors")
    edit(config, tensors)
    return save_model_file(tmp_path / "puck.safetensors", tensors, config)


def _set(path: str, value: object) -> Callable[[Config, Tensors], None]:
    def edit(config: Config, _: Tensors) -> None:
        *parents, last = path.split(".")
        for part in parents:
            config = config[part]
        config[last] = value

    return edit


def _drop(key: str) -> Callable[[Config, Tensors], None]:
    return lambda config, _: config.pop(key)


def _tensor(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Config, Tensors], None]:
    def edit(_: Config, tensors: Tensors) -> None:
        tensors[name] = make(tensors[name])

    return edit


def _nan_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = math.nan
    return t


CASES = [
    (_drop("hparams"), "field 'hparams' is missing"),
    (_set("hparams.grid_size", "32"), "field 'hparams.grid_size' must be int, got '32'"),
    (_set("hparams.epochs", True), "field 'hparams.epochs' must be int"),
    (_set("hparams.sigma", math.inf), "field 'hparams.sigma' must be float"),
    (_set("hparams.no_such_option", 1), "field 'hparams.no_such_option' is not a setting of CFMConfig"),
    (_set("hparams", [1, 2]), "field 'hparams' must be a JSON object"),
    (_set("channels", "ab"), "field 'channels' must be two positive integers"),
    (_set("channels", [7, 9]), "Error(s) in loading state_dict"),
    (_set("method", "../x"), "field 'method' must be one of"),
    (_set("thresholds.image", math.nan), "field 'thresholds': thresholds.image must be finite"),
    (_drop("thresholds"), None),  # a model without thresholds is legitimate (labels are then left to the user)
    (_set("fallback.thresholds.2d.pixel", -math.inf), "field 'fallback.thresholds.2d'"),
    (_set("fallback.stats.3d", [0.0, 0.0]), "field 'fallback.stats.3d' must be [mean, std > 0]"),
    (_set("fallback.grid", "28"), "field 'fallback.grid' must be a positive integer"),
    (_set("category", "../../x"), "contains a path separator"),
    (_tensor("map_to_3d.input.weight", _nan_first), "tensor 'map_to_3d.input.weight' holds 1 non-finite value"),
    (_tensor("map_to_3d.input.weight", lambda t: t[:, :3].contiguous()), "size mismatch for input.weight"),
    (_tensor("fallback.2d", lambda t: t[:, :5].contiguous()), "tensor 'fallback.2d' has 5 columns"),
    (_tensor("fallback.3d", lambda t: t[0].contiguous()), "tensor 'fallback.3d' must be a non-empty matrix"),
    (_tensor("fallback.3d", lambda t: t.to(torch.complex64)), "unsupported dtype"),
]


@pytest.mark.parametrize(("edit", "message"), CASES)
def test_a_tampered_model_file_names_the_file_and_the_field(
    edit: Callable[[Config, Tensors], None], message: str | None, hostile_run, tmp_path: Path
) -> None:
    run, cache = hostile_run
    path = _tampered(run, tmp_path, edit)
    if message is None:
        assert load_trained(path, cache_dir=str(cache)).thresholds is None
        return
    with pytest.raises(ModelFileError) as raised:
        load_trained(path, cache_dir=str(cache))
    text = str(raised.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_model_file_with_broken_metadata_json(hostile_run, tmp_path: Path) -> None:
    run, _ = hostile_run
    with safe_open(str(run / "puck.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    for text, message in (('{"format": ', "is not valid JSON"), ("[1, 2]", "must be a JSON object")):
        path = tmp_path / "broken.safetensors"
        save_file(tensors, str(path), metadata={"mmiad_config": text})
        with pytest.raises(ModelFileError, match="mmiad_config") as raised:
            load_trained(path)
        assert str(raised.value).startswith(str(path)) and message in str(raised.value)


def _run_copy(run: Path, tmp_path: Path, index: object) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "run.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return copy


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ('{"models": ', "not valid JSON"),
        ("[]", "expected a JSON object"),
        ({"method": "cfm"}, "field 'models' is missing"),
        ({"models": {"puck": "../../x.safetensors"}}, "contains a path separator"),
        ({"models": {"..": "puck.safetensors"}}, "refers to a folder"),
        ({"models": {"puck": "/etc/passwd"}}, "contains a path separator"),
        ({"models": {"puck": ""}}, "an empty name"),
        ({"models": {"puck": "puck.safetensors"}, "categories": ["a/b"]}, "contains a path separator"),
    ],
)
def test_a_tampered_run_index_names_run_json(index: object, message: str, hostile_run, tmp_path: Path) -> None:
    run = _run_copy(hostile_run[0], tmp_path, index)
    with pytest.raises(ModelFileError) as raised:
        run_models(run)
    assert str(raised.value).startswith(str(run / "run.json")) and message in str(raised.value)


def _entry(cache: Path) -> Path:
    return next((cache / "features").rglob("*.safetensors"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: t.pop("points.neighbors"),
        lambda t: t.update({"image": t["image"][:3].contiguous()}),
        lambda t: t.update({"points.features": torch.full_like(t["points.features"], math.nan)}),
        lambda t: t.update({"points.neighbors": t["points.neighbors"] + 10**6}),
        lambda t: t.update({"points.pixel_index": t["points.pixel_index"].float()}),
        lambda t: t.update({"points.grid_size": torch.tensor([7])}),
    ],
)
def test_a_damaged_cache_entry_is_a_miss_and_is_rebuilt(damage, hostile_run, tiny_dataset: Path, tmp_path) -> None:
    from mmiad.data.mvtec3d import list_records

    run, _ = hostile_run
    trained = load_trained(run_models(run)["puck"], cache_dir=str(tmp_path / "cache"))
    pipeline = trained.model.pipeline
    record = pipeline.preprocess(list_records(tiny_dataset, "puck", "test")[:1])[0]
    fresh = pipeline.extract(record)
    entry = _entry(tmp_path / "cache")
    tensors = load_file(str(entry))
    damage(tensors)
    save_file(tensors, str(entry))
    assert pipeline.cache.get(entry.stem, validate=pipeline.entry_problem) is None
    assert not entry.exists()  # the bad entry is removed ...
    rebuilt = pipeline.extract(record)  # ... and rebuilt from the source files
    assert entry.exists()
    assert torch.equal(rebuilt.image, fresh.image) and torch.equal(rebuilt.points.features, fresh.points.features)
    hits = pipeline.cache.hits
    again = pipeline.extract(record)  # a valid entry is a hit
    assert pipeline.cache.hits == hits + 1 and torch.equal(again.points.neighbors, fresh.points.neighbors)
