"""Importing M3DM's UFF checkpoint (``fusion_pretrain.py`` output) instead of training UFF.

The file is written as MAE's ``misc.save_model`` writes it: ``{'model': FeatureFusionBlock.state_dict(),
'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}``, with the key names of ``models/feature_fusion.py``.
The imported model's fused patch features are checked against a functional re-derivation of the official
``feature_fusion`` (LayerNorm → fc1 → GELU → fc2 per modality, concatenated point-first).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained
from mmiad.engine.imports import import_run
from mmiad.features.checkpoints import CheckpointError
from mmiad.methods.m3dm.model import patch_sets

C2, C3 = 42, 33  # weight-free 2D and 3D channels


def official_uff_state(g: torch.Generator, xyz_dim: int = C3, rgb_dim: int = C2) -> dict[str, torch.Tensor]:
    """``FeatureFusionBlock(xyz_dim, rgb_dim, mlp_ratio=4.)`` state dict with random values."""
    s: dict[str, torch.Tensor] = {}
    for modality, dim in (("xyz", xyz_dim), ("rgb", rgb_dim)):
        s[f"{modality}_norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        s[f"{modality}_norm.bias"] = 0.1 * torch.randn(dim, generator=g)
        for name, (rows, cols) in {"fc1": (4 * dim, dim), "fc2": (dim, 4 * dim)}.items():
            s[f"{modality}_mlp.{name}.weight"] = torch.randn(rows, cols, generator=g) / cols**0.5
            s[f"{modality}_mlp.{name}.bias"] = 0.1 * torch.randn(rows, generator=g)
        s[f"{modality}_head.weight"] = torch.randn(256, dim, generator=g) / dim**0.5
        s[f"{modality}_head.bias"] = torch.zeros(256)
    return s


def official_fusion(s: dict[str, torch.Tensor], xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """``FeatureFusionBlock.feature_fusion`` on N rows: [mlp(LN(xyz)), mlp(LN(rgb))]."""

    def branch(x: torch.Tensor, m: str) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-1:], s[f"{m}_norm.weight"], s[f"{m}_norm.bias"])
        x = F.gelu(x @ s[f"{m}_mlp.fc1.weight"].T + s[f"{m}_mlp.fc1.bias"])
        return x @ s[f"{m}_mlp.fc2.weight"].T + s[f"{m}_mlp.fc2.bias"]

    return torch.cat([branch(xyz, "xyz"), branch(rgb, "rgb")], dim=-1)


def write_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """What ``misc.save_model`` writes (optimizer and scaler state plus the parsed command line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.003, "betas": (0.9, 0.95), "params": [0, 1]}]},
            "epoch": 2,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
            "args": argparse.Namespace(batch_size=16, lr=0.003, output_dir="checkpoints", data_path="patch_lib"),
        },
        path,
    )
    return path


def test_imported_uff_fuses_as_the_official_block(tiny_dataset: Path, tmp_path: Path, tiny_hparams) -> None:
    state = official_uff_state(torch.Generator().manual_seed(0))
    path = write_checkpoint(tmp_path / "release" / "checkpoint-2.pth", state)
    cache = str(tmp_path / "cache")
    hparams = {**tiny_hparams["m3dm"], "extractors": "weightfree"}
    files, _ = import_run(
        "m3dm",
        path,
        tmp_path / "run",
        data_root=tiny_dataset,
        categories=["puck"],
        hparams=hparams,
        cache_dir=cache,
        fallback=False,
    )
    trained = load_trained(files["puck"], cache_dir=cache)
    model = trained.model
    assert model.loss_history_ == []  # UFF loaded, not trained
    for name, tensor in state.items():
        torch.testing.assert_close(model.uff_.state_dict()[name], tensor, rtol=0, atol=0)
    record = list_records(tiny_dataset, "puck", "test")[0]
    sets = patch_sets(model.pipeline.extract(record), model.config.rgb_grid, model.config.point_grid)
    expected = official_fusion(state, sets.point, sets.rgb_fine)
    torch.testing.assert_close(model.fused(sets), expected, rtol=1e-5, atol=1e-5)
    assert trained.thresholds is not None and trained.info["category"] == "puck"


def test_m3dm_import_needs_data_and_a_fitting_file(tiny_dataset: Path, tmp_path: Path, tiny_hparams) -> None:
    g = torch.Generator().manual_seed(0)
    good = write_checkpoint(tmp_path / "good.pth", official_uff_state(g))
    with pytest.raises(ValueError, match="needs --data"):
        import_run("m3dm", good, tmp_path / "run")
    with pytest.raises(ValueError, match="contradicts"):
        import_run("m3dm", good, tmp_path / "run", data_root=tiny_dataset, hparams={"use_uff": False})
    extra = official_uff_state(g)
    extra["fusion_token"] = torch.zeros(3)
    for bad, expected in (
        (write_checkpoint(tmp_path / "extra.pth", extra), r"unexpected keys \(1\): fusion_token"),
        (write_checkpoint(tmp_path / "cfm.pth", {"input.weight": torch.ones(2, 2)}), r"not a M3DM UFF"),
    ):
        with pytest.raises(CheckpointError, match=expected) as error:
            import_run(
                "m3dm",
                bad,
                tmp_path / "run",
                data_root=tiny_dataset,
                categories=["puck"],
                hparams={**tiny_hparams["m3dm"], "extractors": "weightfree"},
                cache_dir=str(tmp_path / "c"),
            )
        assert str(error.value).startswith(str(bad))
    # A UFF for other feature sizes (the released 1152/768 one on weight-free features) fails on shapes.
    wide = write_checkpoint(tmp_path / "wide.pth", official_uff_state(g, xyz_dim=40))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*xyz_norm.weight: \(40,\) vs \(33,\)"):
        import_run(
            "m3dm",
            wide,
            tmp_path / "run",
            data_root=tiny_dataset,
            categories=["puck"],
            hparams={**tiny_hparams["m3dm"], "extractors": "weightfree"},
            cache_dir=str(tmp_path / "c"),
        )
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.import-*"))
