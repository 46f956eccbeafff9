"""``mmiad import --method glfm``: the released adapted checkpoint becomes a unified run that no longer needs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mmiad.cli.main import main
from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained
from mmiad.features.pointmae import PointMaeEncoder


def test_import_builds_memories_and_carries_the_adapted_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    state = {**PointMaeEncoder(12, (11,)).state_dict(), "classify.0.weight": torch.randn(2, 384)}
    state["classify.0.bias"] = torch.zeros(2)
    source = tmp_path / "pointmae_adapted.pth"
    torch.save(state, source)
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    args = ["import", "--method", "glfm", "--from", str(source), "--data", str(tiny_dataset), "--out", str(run),
            "--categories", "puck", "--cache-dir", cache, "--no-fallback", "--set", "image_size=64",
            "--set", "num_group=16", "--set", "group_size=16", "--set", "prototypes=1"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((run / "run.json").read_text())["models"] == {"unified": "unified.safetensors"}
    source.unlink()  # the run carries the adapted weights itself
    trained = load_trained(run / "unified.safetensors", cache_dir=cache)
    extractor = trained.model.pipeline.point_extractor
    torch.testing.assert_close(
        extractor.model.blocks.blocks[1].attn.proj.weight, state["blocks.blocks.1.attn.proj.weight"]
    )
    torch.testing.assert_close(
        extractor.model.encoder.second_conv[1].running_var, state["encoder.second_conv.1.running_var"]
    )
    scores = [p.pred_score for p in trained.model.predict(list_records(tiny_dataset, "puck", "test"))]
    assert len(scores) > 0 and np.isfinite(scores).all()
