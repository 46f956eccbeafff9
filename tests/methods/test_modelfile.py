from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mmiad.methods.modelfile import (
    ModelFileError,
    load_model_file,
    prefixed,
    read_model_config,
    save_model_file,
    split_prefixed,
)


def test_round_trip_keeps_tensors_and_config(tmp_path) -> None:
    tensors = {"a.weight": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([1, 2])}
    path = save_model_file(tmp_path / "m.safetensors", tensors, {"method": "cfm", "thresholds": {"image": 0.5}})
    loaded, config = load_model_file(path)
    assert torch.equal(loaded["a.weight"], tensors["a.weight"]) and torch.equal(loaded["b"], tensors["b"])
    assert config["method"] == "cfm" and config["thresholds"] == {"image": 0.5}
    assert config["format"] == "mmiad-model" and "mmiad_version" in config
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind


def test_foreign_and_corrupt_files_are_rejected(tmp_path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ModelFileError, match="without an mmiad config"):
        read_model_config(foreign)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a readable"):
        read_model_config(corrupt)
    with pytest.raises(ModelFileError, match="not found"):
        read_model_config(tmp_path / "missing.safetensors")


def test_newer_format_version_is_refused(tmp_path) -> None:
    path = tmp_path / "future.safetensors"
    header = {"format": "mmiad-model", "format_version": 99}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"mmiad_config": json.dumps(header)})
    with pytest.raises(ModelFileError, match="newer"):
        read_model_config(path)


def test_prefix_helpers_are_inverse() -> None:
    state = {"w": torch.ones(1), "layer.b": torch.zeros(1)}
    combined = {**prefixed(state, "net"), "other.w": torch.ones(2)}
    assert set(split_prefixed(combined, "net")) == {"w", "layer.b"}
