"""Stage I's losses and training forward against float64 re-derivations of the official ``loss.py``/``Encoder``."""

from __future__ import annotations

import numpy as np
import torch

from mmiad.features.pointmae import MiniPointNet
from mmiad.methods.glfm.adapt import dice_loss, focal_loss, train_tokens


def test_focal_loss_matches_the_official_formula() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 2))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    target = rng.integers(0, 2, size=50)
    total = 0.0
    for p, y in zip(probabilities, target, strict=True):
        one_hot = np.clip(np.eye(2)[y], 1e-5, 1 - 1e-5)
        pt = float(one_hot @ p) + 1e-5
        total += -((1 - pt) ** 2) * np.log(pt)
    got = focal_loss(torch.from_numpy(probabilities).float(), torch.from_numpy(target))
    np.testing.assert_allclose(float(got), total / 50, rtol=1e-5)


def test_dice_loss_matches_the_official_formula() -> None:
    rng = np.random.default_rng(1)
    p, y = rng.uniform(size=80), rng.integers(0, 2, size=80).astype(float)
    expected = 1 - (2 * np.sum(p * y) + 1) / (np.sum(p) + np.sum(y) + 1)
    np.testing.assert_allclose(
        float(dice_loss(torch.from_numpy(p).float(), torch.from_numpy(y).float())), expected, rtol=1e-6
    )


def test_training_forward_is_the_cloud_statistics_forward_and_updates_running_stats() -> None:
    """In training mode the modules' BatchNorm normalises with the cloud's statistics: the same tokens as the
    extractor's closed-form ``batchnorm="cloud"`` path; the running mean moves by momentum 0.1."""
    torch.manual_seed(0)
    encoder = MiniPointNet(out_dim=32, batchnorm="cloud")
    groups = torch.randn(12, 16, 3) * 0.01
    with torch.no_grad():  # the extractor's closed-form path runs without autograd
        reference = encoder(groups)
    encoder.train()
    tokens = train_tokens(encoder, groups)
    torch.testing.assert_close(tokens, reference, rtol=1e-4, atol=1e-5)
    bn = encoder.first_conv[1]
    conv = encoder.first_conv[0]
    hidden = (groups.reshape(-1, 3).double() @ conv.weight[..., 0].double().T + conv.bias.double()).detach()
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.1 * hidden.mean(dim=0).numpy(), rtol=1e-4, atol=1e-7)
