"""G2SF's unimodal banks: sizes, scalar standardisation, NN distances and top-k indices against brute force."""

from __future__ import annotations

import numpy as np
import torch

from mmiad.features.base import PointFeatures
from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.g2sf.banks import PatchRows, UnimodalBanks, patch_rows, upsample_rgb
from mmiad.methods.memorybank import MemoryBank


def _rows(seed: int, rgb_grid: int = 4, point_grid: int = 8) -> PatchRows:
    gen = torch.Generator().manual_seed(seed)
    point = torch.randn(point_grid**2, 6, generator=gen)
    point[: point_grid * 2] = 0  # two background rows of the grid
    return PatchRows(rgb=3.0 + 2.0 * torch.randn(rgb_grid**2, 5, generator=gen), point=point)


def _banks() -> UnimodalBanks:
    return UnimodalBanks(MemoryBank(fraction=0.1, device="cpu"), MemoryBank(fraction=0.1, device="cpu"), 4, 8)


def test_upsample_repeats_each_rgb_patch_over_2x2() -> None:
    rows = torch.arange(16 * 3, dtype=torch.float32).view(16, 3)
    fine = upsample_rgb(rows, 4, 8).view(8, 8, 3)
    for r in range(8):
        for c in range(8):
            assert torch.equal(fine[r, c], rows[(r // 2) * 4 + c // 2])


def test_banks_sizes_statistics_and_neighbours_match_brute_force() -> None:
    banks = _banks()
    train = [_rows(seed) for seed in range(5)]
    for rows in train:
        banks.add(rows)
    banks.finalize()
    all_rgb = torch.cat([r.rgb for r in train]).double()
    assert len(banks.rgb) == int(0.1 * 16 * 5) and len(banks.point) == int(0.1 * 64 * 5)
    assert abs(banks.rgb.mean - float(all_rgb.mean())) < 1e-9 and abs(banks.rgb.std - float(all_rgb.std())) < 1e-9
    assert banks.point.mean == 0.0 and banks.point.std == 1.0
    test = _rows(99)
    k = 7
    found = banks.neighbours(test, k)
    rgb = upsample_rgb((test.rgb.double() - banks.rgb.mean) / banks.rgb.std, 4, 8)
    assert banks.rgb.bank is not None and banks.point.bank is not None
    for part, queries, bank, column in ((0, rgb, banks.rgb.bank, 0), (1, test.point.double(), banks.point.bank, k)):
        brute = torch.cdist(queries, bank.double())
        order = torch.argsort(brute, dim=1)[:, :k]
        np.testing.assert_allclose(found.distances[:, part].numpy(), brute.min(dim=1).values.numpy(), rtol=1e-5)
        np.testing.assert_array_equal(found.indices[:, column : column + k].numpy(), order.numpy())
    assert torch.equal(found.background, test.point.sum(dim=1) == 0) and int(found.background.sum()) == 16
    torch.testing.assert_close(found.features[:, :5], rgb.float())
    pair = banks.coreset_rows(found.indices, 2, k)
    torch.testing.assert_close(pair[:, :5], banks.rgb.bank[found.indices[:, 2]])
    torch.testing.assert_close(pair[:, 5:], banks.point.bank[found.indices[:, k + 2]])


def test_patch_rows_keep_the_rgb_grid_and_project_points() -> None:
    valid = np.zeros((16, 16), bool)
    valid[4:12, 4:12] = True
    index = torch.from_numpy(np.flatnonzero(valid)).long()
    feats = torch.randn(index.numel(), 6, generator=torch.Generator().manual_seed(0))
    points = PointFeatures(feats, index, torch.arange(index.numel()).unsqueeze(1), torch.ones(index.numel(), 1), 16)
    image = torch.randn(5, 4, 4)
    rows = patch_rows(SampleFeatures(image, points, None), 4, 8)
    assert rows.rgb.shape == (16, 5) and rows.point.shape == (64, 6)
    torch.testing.assert_close(rows.rgb, image.flatten(1).T)  # 4×4 image at rgb_grid 4: no pooling, no duplicate
    torch.testing.assert_close(rows.point, points.to_grid(8).flatten(1).T)


def test_g2sf_extractor_preset_uses_512_groups() -> None:
    from mmiad.features.pointmae import POINTMAE_PRESETS
    from mmiad.features.registry import EXTRACTOR_PRESETS

    preset = EXTRACTOR_PRESETS["dino-pointmae512"]
    point = POINTMAE_PRESETS[preset.point]
    assert preset.image == "dino_vitb8"
    assert (point.num_group, point.group_size, point.keep_blocks, point.layers) == (512, 128, 12, (3, 7, 11))
