"""Weights folder resolution, the known-files table, and the builders (random init only on request)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import torch

from mmiad.data.errors import DataError
from mmiad.features.base import ImageFeatureExtractor, PointFeatureExtractor
from mmiad.features.vit import VIT_PRESETS, VisionTransformer
from mmiad.features.weights import (
    ENV_VAR,
    KNOWN_WEIGHTS,
    MissingWeightsError,
    _weights_id,
    build_image_extractor,
    build_point_extractor,
    resolve_weights,
    weights_dir,
)


def test_weights_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert weights_dir() == Path("~/.cache/mmiad/weights").expanduser()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert weights_dir() == tmp_path / "env"
    assert weights_dir(tmp_path / "flag") == tmp_path / "flag"


def test_missing_weights_error_says_which_file_goes_where(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights("pointmae", tmp_path)
    message = str(info.value)
    assert "'pointmae_pretrain.pth' or 'pretrain.pth'" in message and str(tmp_path) in message
    assert "github.com/Pang-Yatian/Point-MAE/releases/download/main/pretrain.pth" in message
    with pytest.raises(ValueError, match="unknown weights"):
        resolve_weights("resnet", tmp_path)


def test_resolution_order_alternatives_and_size_check(tmp_path: Path) -> None:
    timm = tmp_path / "vit_base_patch8_224.dino" / "model.safetensors"
    timm.parent.mkdir()
    timm.write_bytes(b"x")
    names = VIT_PRESETS["dino_vitb8"].weights
    assert resolve_weights(names, tmp_path) == timm  # official file absent: timm copy accepted
    (tmp_path / "dino_vitbase8_pretrain.pth").write_bytes(b"x")
    assert resolve_weights(names, tmp_path) == tmp_path / "dino_vitbase8_pretrain.pth"
    (tmp_path / "pretrain.pth").write_bytes(b"truncated")  # Point-MAE's released name, but far too small
    with pytest.raises(DataError, match="expected 348288755"):
        resolve_weights("pointmae", tmp_path)


def test_known_hashes_are_full_sha256_or_none() -> None:
    for entry in KNOWN_WEIGHTS.values():
        for known in entry.files:
            assert known.sha256 is None or (len(known.sha256) == 64 and int(known.sha256, 16) >= 0)


def test_hash_mismatch_with_published_value_warns(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not the published file")
    with pytest.warns(UserWarning, match="differs from the published"):
        digest = _weights_id(path)
    assert digest == hashlib.sha256(b"not the published file").hexdigest()


def test_image_builder_loads_checkpoint_and_config_carries_its_hash(tmp_path: Path) -> None:
    spec = VIT_PRESETS["dino_vits8"]
    state = VisionTransformer(spec).state_dict()  # a full 12-block checkpoint
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real checkpoint must not warn
        extractor = build_image_extractor("dino_vits8", weights_dir=tmp_path, keep_blocks=1)
    config = extractor.config()
    assert config["name"] == "dino_vits8" and config["keep_blocks"] == 1
    assert config["weights"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(extractor.model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert isinstance(extractor, ImageFeatureExtractor)


def test_random_init_needs_the_flag_warns_and_is_seeded(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError):
        build_point_extractor("pointmae_keep1", weights_dir=tmp_path)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        first = build_point_extractor("pointmae_keep1", random_init=True, seed=3, num_group=8, group_size=4)
    with pytest.warns(UserWarning):
        again = build_point_extractor("pointmae_keep1", random_init=True, seed=3)
    with pytest.warns(UserWarning):
        other = build_point_extractor("pointmae_keep1", random_init=True, seed=4)
    weight = "blocks.blocks.0.attn.qkv.weight"
    assert torch.equal(first.model.state_dict()[weight], again.model.state_dict()[weight])
    assert not torch.equal(first.model.state_dict()[weight], other.model.state_dict()[weight])
    assert first.config()["weights"] == "random-3" and first.config()["num_group"] == 8
    assert isinstance(first, PointFeatureExtractor)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        build_image_extractor("dino_vitb8_keep1", random_init=True)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left untouched


def test_point_builder_keep_override_uses_official_layers() -> None:
    with pytest.warns(UserWarning):
        extractor = build_point_extractor("pointmae", random_init=True, keep_blocks=4)
    assert extractor.config()["layers"] == (1, 2, 3)
    assert extractor.out_channels == 1152 and len(extractor.model.blocks.blocks) == 4
