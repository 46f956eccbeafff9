from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmiad.features.base import PointFeatures
from mmiad.features.pipeline import SampleFeatures
from mmiad.methods.m3dm import M3DM, FeatureFusionBlock, M3DMConfig, patch_sets
from mmiad.methods.m3dm.fusion import cosine_lr, official_training_rgb
from mmiad.methods.memorybank import MemoryBank


def _features() -> SampleFeatures:
    valid = np.zeros((16, 16), bool)
    valid[4:12, 4:12] = True
    index = torch.from_numpy(np.flatnonzero(valid)).long()
    feats = torch.randn(index.numel(), 6, generator=torch.Generator().manual_seed(0))
    points = PointFeatures(feats, index, torch.arange(index.numel()).unsqueeze(1), torch.ones(index.numel(), 1), 16)
    image = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(1))
    return SampleFeatures(image=image, points=points, inputs=None)  # type: ignore[arg-type]


def test_patch_sets_follow_official_alignment() -> None:
    sets = patch_sets(_features(), rgb_grid=4, point_grid=8)
    assert sets.point.shape == (64, 6) and sets.rgb.shape == (16, 4) and sets.rgb_fine.shape == (64, 4)
    # 4 → 8 adaptive pooling repeats every RGB patch over a 2×2 block
    fine = sets.rgb_fine.T.reshape(4, 8, 8)
    assert torch.equal(fine[:, ::2, ::2], fine[:, 1::2, 1::2])
    assert torch.equal(fine[:, ::2, ::2].reshape(4, -1).T, sets.rgb)
    assert sets.foreground.sum() > 0 and not sets.foreground.all()


def test_uff_switch_changes_fused_features() -> None:
    sets = patch_sets(_features(), rgb_grid=4, point_grid=8)
    plain = M3DM(use_uff=False)
    plain.uff_ = None
    torch.testing.assert_close(plain.fused(sets), torch.cat([sets.point, sets.rgb_fine], dim=1))
    fused = M3DM()
    torch.manual_seed(0)
    fused.uff_ = FeatureFusionBlock(6, 4).eval()
    out = fused.fused(sets)
    assert out.shape == (64, 10) and not torch.allclose(out, plain.fused(sets))
    expected_xyz = fused.uff_.xyz_mlp.fc2(F.gelu(fused.uff_.xyz_mlp.fc1(F.layer_norm(sets.point, (6,)))))
    torch.testing.assert_close(out[:, :6], expected_xyz.detach(), rtol=1e-5, atol=1e-6)


def test_infonce_matches_hand_formula_and_training_lowers_it() -> None:
    torch.manual_seed(0)
    block = FeatureFusionBlock(6, 4)
    xyz, rgb = torch.randn(5, 6), torch.randn(5, 4)
    with torch.no_grad():
        q = F.normalize(block.rgb_head(block.rgb_mlp(block.rgb_norm(rgb))), dim=1)
        k = F.normalize(block.xyz_head(block.xyz_mlp(block.xyz_norm(xyz))), dim=1)
        logits = q @ k.T
        expected = -sum(math.log(math.exp(logits[i, i]) / float(torch.exp(logits[i]).sum())) for i in range(5)) / 5
        assert float(block.contrastive_loss(xyz, rgb)) == pytest.approx(2 * expected, rel=1e-5)
    mixing = torch.randn(6, 4)
    xyz = torch.randn(64, 6)
    rgb = xyz @ mixing  # the modalities are related, so alignment is learnable
    optimiser = torch.optim.SGD(block.parameters(), lr=0.5)
    before = float(block.contrastive_loss(xyz, rgb).detach())
    for _ in range(30):
        optimiser.zero_grad()
        loss = block.contrastive_loss(xyz, rgb)
        loss.backward()
        optimiser.step()
    assert float(block.contrastive_loss(xyz, rgb).detach()) < before - 0.5


def test_cosine_schedule() -> None:
    assert cosine_lr(0, 10, 2, 1.0) == 0.0 and cosine_lr(1, 10, 2, 1.0) == 0.5
    assert cosine_lr(2, 10, 2, 1.0) == 1.0 and cosine_lr(6, 10, 2, 1.0) == pytest.approx(0.5)


def _banks() -> dict[str, MemoryBank]:
    gen = torch.Generator().manual_seed(3)
    banks = {name: MemoryBank(fraction=0.1) for name in ("point", "rgb", "fused")}
    banks["point"].add(torch.randn(200, 5, generator=gen) + 2, uncounted_zero_rows=100)
    banks["rgb"].add(torch.randn(300, 3, generator=gen) * 4)
    banks["fused"].add(torch.randn(800, 8, generator=gen))
    return banks


def test_paper_normalisation_and_coreset_sizes() -> None:
    banks = _banks()
    stats = {name: bank.statistics() for name, bank in banks.items()}
    M3DM(point_coreset="foreground")._finalize_banks(banks, progress=False)
    assert [len(banks[n]) for n in ("point", "rgb", "fused")] == [20, 30, 80]
    for name, bank in banks.items():
        assert (bank.mean, bank.std) == pytest.approx(stats[name])


def test_compat_uses_mixed_statistics_and_missized_coresets() -> None:
    banks = _banks()
    point_mean, rgb_std = banks["point"].statistics()[0], banks["rgb"].statistics()[1]
    model = M3DM(compat=True, point_coreset="foreground")
    assert model.settings.smoothing == "pil_uint8" and model.config.weight_decay == 0.01  # the official default
    model._finalize_banks(banks, progress=False)
    # point: 10% of all 300 patches (background included); rgb and fused: 10% of the point coreset
    assert [len(banks[n]) for n in ("point", "rgb", "fused")] == [30, 3, 3]
    for bank in banks.values():
        assert (bank.mean, bank.std) == pytest.approx((point_mean, rgb_std))


def test_config_validation() -> None:
    assert M3DMConfig().use_uff and M3DMConfig().lambdas == (1.0, 0.1, 1.0)
    with pytest.raises(ValueError):
        M3DMConfig(lambdas=(1.0, 1.0))


def test_compat_uff_training_rgb_is_the_official_tiling_not_an_upsample() -> None:
    coarse = torch.arange(784.0)[:, None].repeat(1, 2)  # row i holds the value i
    scrambled = official_training_rgb(coarse, 3136)
    # The official dump: tile 4×, view as (784, 4, C), swap the first two axes, flatten back to 3136 rows.
    official = coarse.repeat(4, 1).reshape(784, 4, -1).permute(1, 0, 2).reshape(3136, -1)
    torch.testing.assert_close(scrambled, official)
    assert scrambled[[0, 1, 2, 784, 785, 3135], 0].tolist() == [0, 4, 8, 1, 5, 783]
    upsampled = F.interpolate(coarse.T.reshape(1, 2, 28, 28), size=56).reshape(2, -1).T
    assert not torch.equal(scrambled, upsampled)
    with pytest.raises(ValueError, match="multiple"):
        official_training_rgb(coarse, 1000)


def test_compat_trains_uff_on_the_scrambled_rows(tiny_dataset, tiny_hparams, tmp_path) -> None:
    from mmiad.data.mvtec3d import list_records

    records = list_records(tiny_dataset, "puck", "train")[:2]
    states = []
    for compat in (False, True):  # same weight decay, so only the RGB training rows differ
        model = M3DM(**tiny_hparams["m3dm"], compat=compat, weight_decay=0.01, accum_iter=1, cache_dir=str(tmp_path))
        model._train_uff(records, progress=False)
        states.append(model.uff_.state_dict())
    assert states[0]["xyz_head.weight"].shape == states[1]["xyz_head.weight"].shape
    assert not torch.equal(states[0]["rgb_mlp.fc1.weight"], states[1]["rgb_mlp.fc1.weight"])
