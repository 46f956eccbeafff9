from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmiad.data.mvtec3d import list_records
from mmiad.features.base import PointFeatures
from mmiad.features.pipeline import SampleFeatures
from mmiad.features.registry import EXTRACTOR_PRESETS
from mmiad.methods.btf import BTF, BTFConfig, btf_patches


def _features(image: torch.Tensor, grid: int = 8) -> SampleFeatures:
    valid = np.zeros((grid, grid), bool)
    valid[2:5, 3:6] = True
    index = torch.from_numpy(np.flatnonzero(valid)).long()
    feats = torch.arange(index.numel() * 2, dtype=torch.float32).view(-1, 2)
    points = PointFeatures(feats, index, torch.arange(index.numel()).unsqueeze(1), torch.ones(index.numel(), 1), grid)
    return SampleFeatures(image=image, points=points, inputs=None)  # type: ignore[arg-type]


def test_patches_concatenate_pooled_rgb_and_projected_points() -> None:
    image = torch.randn(5, 8, 8)
    features = _features(image)
    rows = btf_patches(features, 4)
    assert rows.shape == (16, 7)
    torch.testing.assert_close(rows[:, :5], F.adaptive_avg_pool2d(image[None], 4)[0].flatten(1).T)
    torch.testing.assert_close(rows[:, 5:], features.points.to_grid(4).flatten(1).T)


def test_config_paper_default_and_compat() -> None:
    assert BTFConfig().smoothing == "gaussian" and BTFConfig().grid_size == 28
    assert BTFConfig(compat=True).smoothing == "gaussian"  # what the user set is kept...
    assert BTFConfig(compat=True).resolved().smoothing == "pil_uint8"  # ...and the official blur runs
    with pytest.raises(ValueError):
        BTFConfig(smoothing="median")
    assert EXTRACTOR_PRESETS["wrn50-fpfh"].image == "wrn50"


def test_fit_reports_bank_size_and_scores_train_samples_low(tiny_dataset: Path, tmp_path: Path) -> None:
    train = list_records(tiny_dataset, "puck", "train")
    model = BTF(cache_dir=str(tmp_path), image_size=64, grid_size=8, knn_backend="torch").fit(train)
    config = model.get_config()
    assert config["banks"]["patch"] == {"rows": int(0.1 * 64 * len(train)), "collected": 64 * len(train)}
    assert config["feature_dim"] == model.bank_.bank.shape[1]
    # the coreset's first row is the first training patch, so that patch scores exactly zero
    first = next(iter(model.predict(train[:1])))
    assert first.modality_maps["patch"][0, 0] == 0.0
    assert first.anomaly_map.shape == (64, 64)


def test_btf_rgb_weights_prefer_timms_racm_file(tmp_path) -> None:
    """3D-ADS loads timm's ``wide_resnet50_2`` (unpinned timm): timm's racm weights, not torchvision's."""
    from mmiad.features.weights import resolve_weights

    torchvision_file = tmp_path / "wide_resnet50_2-95faca4d.pth"
    torchvision_file.write_bytes(b"x")
    assert resolve_weights("wide_resnet50_2", tmp_path) == torchvision_file  # still usable alone
    racm = tmp_path / "wide_resnet50_2.racm_in1k" / "model.safetensors"
    racm.parent.mkdir()
    racm.write_bytes(b"x")
    assert resolve_weights("wide_resnet50_2", tmp_path) == racm
