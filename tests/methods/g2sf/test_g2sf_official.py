"""Importing G2SF's released fusion files: the LSPN, μ and θ are used as given; anything else is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmiad.data.mvtec3d import list_records
from mmiad.features.checkpoints import CheckpointError
from mmiad.methods.g2sf import G2SF
from mmiad.methods.g2sf.banks import patch_rows
from mmiad.methods.g2sf.lspn import LSPN
from mmiad.methods.g2sf.official import read_array

TINY = {**G2SF.tiny_hparams}


def _release(root: Path, category: str, in_dim: int) -> tuple[dict, np.ndarray, np.ndarray]:
    folder = root / category / "fusion"
    folder.mkdir(parents=True)
    torch.manual_seed(7)
    state = LSPN(in_dim, TINY["hidden"], TINY["emb_dim"]).state_dict()
    torch.save(state, folder / "MMScoringTrainerV2.pth")
    mu, theta = np.array([2.5, 0.7], np.float32), np.array([[0.768], [-1.261]], np.float32)
    np.save(folder / "score_mean.npy", mu)
    np.save(folder / "global_scale.npy", theta)
    return state, mu, theta


def test_official_fusion_is_loaded_not_trained(tiny_dataset: Path, tmp_path: Path) -> None:
    train = list_records(tiny_dataset, "puck", "train")
    probe = G2SF(cache_dir=str(tmp_path / "cache"), **TINY)
    rows = patch_rows(probe.pipeline.extract(probe.pipeline.preprocess(train[:1])[0]), 8, 16)
    in_dim = rows.rgb.shape[1] + rows.point.shape[1]
    state, mu, _ = _release(tmp_path / "release", "puck", in_dim)
    model = G2SF(cache_dir=str(tmp_path / "cache"), official_fusion=str(tmp_path / "release"), **TINY).fit(train)
    assert all(torch.equal(model.lspn_.state_dict()[k], v) for k, v in state.items())
    np.testing.assert_array_equal(model.mu_.numpy(), mu)
    assert float(model.scale_()[0]) == pytest.approx(0.917, abs=1e-3)  # the sheet's bagel σ_IMG for this θ
    assert not (tmp_path / "cache" / "g2sf").exists()  # nothing synthesised
    # A file for other features is refused with the mismatched keys named.
    with pytest.raises(CheckpointError, match="MMScoringTrainerV2"):
        _release(tmp_path / "other", "puck", in_dim + 3)
        G2SF(cache_dir=str(tmp_path / "cache"), official_fusion=str(tmp_path / "other"), **TINY).fit(train)


def test_npy_files_must_be_plain_float_arrays(tmp_path: Path) -> None:
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "ints.npy", np.array([1, 2]))
    np.save(tmp_path / "nan.npy", np.array([1.0, np.nan]))
    np.save(tmp_path / "good.npy", np.array([1.0, 2.0]))
    for name in ("pickled", "ints", "nan"):
        with pytest.raises(CheckpointError):
            read_array(tmp_path / f"{name}.npy", (2,))
    with pytest.raises(CheckpointError):
        read_array(tmp_path / "good.npy", (2, 1))
    assert read_array(tmp_path / "good.npy", (2,)).tolist() == [1.0, 2.0]
