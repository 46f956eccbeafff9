"""Each G2SF loss term against its formula, computed by hand in float64 on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmiad.methods.g2sf.losses import (
    consistency_loss,
    margin_loss,
    permutation_loss,
    permute_pairs,
    scaling_loss,
    separation_loss,
)
from mmiad.methods.g2sf.training import add_noise, balanced_batches, batch_size

DELTA = np.array([0.2, 1.5, 0.9, 3.0, 0.05, 2.2])
LABELS = np.array([1, 1, 1, -1, -1, -1])


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def test_separation_loss_weighted_and_plain() -> None:
    margin = 4.0
    terms = []
    for d, y in zip(DELTA, LABELS, strict=True):
        if y == 1:
            terms.append(d * min(max(d**2, 0.33), 3.0))
        else:
            inv = 1 / (d + 1e-5)
            terms.append(max(inv - 1 / margin, 0.0) * min(max(inv**2, 0.33), 3.0))
    got = separation_loss(_t(DELTA), torch.from_numpy(LABELS), margin, alpha=2.0)
    assert float(got) == pytest.approx(np.mean(terms), rel=1e-12)
    plain = [d if y == 1 else max(1 / (d + 1e-5) - 1 / margin, 0) for d, y in zip(DELTA, LABELS, strict=True)]
    got = separation_loss(_t(DELTA), torch.from_numpy(LABELS), margin, weighted=False)
    assert float(got) == pytest.approx(np.mean(plain), rel=1e-12)


def test_margin_loss() -> None:
    normal, anomaly = DELTA[LABELS == 1], DELTA[LABELS == -1]
    q = normal.max()
    a_b, n_b = (anomaly / q).min(), (normal / q).max()
    expected = (np.maximum(normal / q - a_b, 0).sum() + np.maximum(n_b - anomaly / q, 0).sum()) / len(DELTA)
    assert expected > 0
    assert float(margin_loss(_t(DELTA), torch.from_numpy(LABELS), 1.0)) == pytest.approx(expected, rel=1e-12)


def test_scaling_and_permutation_losses() -> None:
    w = np.array([[0.5, 1.4], [1.1, 0.9], [2.0, 2.5], [1.0, 0.4]])
    y = np.array([1, 1, -1, -1])
    expected = (math.e - w[y == -1]).mean() + np.maximum(w[y == 1] - 1, 0).mean()
    assert float(scaling_loss(_t(w), torch.from_numpy(y))) == pytest.approx(expected, rel=1e-12)
    assert float(permutation_loss(_t(w))) == pytest.approx((math.e - w).mean(), rel=1e-12)


def test_permute_pairs_shuffles_each_part_within_its_half() -> None:
    f = torch.arange(6 * 4, dtype=torch.float64).view(6, 4)
    p = -torch.arange(6 * 4, dtype=torch.float64).view(6, 4)
    pf, pp = permute_pairs(f, p, 2, torch.Generator().manual_seed(0))
    assert torch.equal(pf[3:], f[3:]) and torch.equal(pp[:3], p[:3])
    for part in (slice(0, 2), slice(2, 4)):
        assert sorted(map(tuple, pf[:3, part].tolist())) == sorted(map(tuple, f[:3, part].tolist()))
        assert sorted(map(tuple, pp[3:, part].tolist())) == sorted(map(tuple, p[3:, part].tolist()))


def test_consistency_broadcast_and_per_sample() -> None:
    rng = np.random.default_rng(0)
    b, anchor, beta = 4, 2, 1.2
    l0, s0 = rng.uniform(0.5, 2, b), rng.uniform(0.5, 2, b)
    near = [(rng.uniform(0.5, 3, b), rng.uniform(0.5, 2, b)) for _ in range(anchor)]
    far = [rng.uniform(0.5, 3, b) for _ in range(anchor)]
    broadcast = sum(
        np.mean([[max(lj[i] - beta * sj[k] / s0[k] * l0[i], 0) for k in range(b)] for i in range(b)]) / anchor
        for lj, sj in near
    )
    diagonal = sum(
        np.mean([max(lj[i] - beta * sj[i] / s0[i] * l0[i], 0) for i in range(b)]) / anchor for lj, sj in near
    )
    far_term = sum(np.mean(np.maximum(l0 - lj, 0)) / anchor for lj in far)
    args = (_t(l0), _t(s0), [(_t(a), _t(c)) for a, c in near], [_t(a) for a in far])
    got_b = consistency_loss(*args, magnitude=beta, form="broadcast")
    got_d = consistency_loss(*args, magnitude=beta, form="per_sample")
    assert float(got_b) == pytest.approx(broadcast + far_term, rel=1e-12)
    assert float(got_d) == pytest.approx(diagonal + far_term, rel=1e-12)
    assert abs(broadcast - diagonal) > 1e-3  # the two forms differ on these inputs


def test_noise_radius_and_direction() -> None:
    rows = torch.zeros(200, 5, dtype=torch.float64)
    noisy = add_noise(rows, 2, torch.tensor([0.3, 2.0], dtype=torch.float64), torch.Generator().manual_seed(0))
    rgb_norm, point_norm = noisy[:, :2].norm(dim=1), noisy[:, 2:].norm(dim=1)
    assert (rgb_norm <= 0.3).all() and (point_norm <= 2.0).all() and point_norm.max() > 1.5
    assert (noisy >= 0).all()  # uniform [0,1) directions: the positive orthant


def test_batch_size_and_balanced_sampler() -> None:
    assert batch_size(10_000_000, 8192) == 8192 and batch_size(2000, 8192) == 70
    labels = torch.tensor([1] * 90 + [-1] * 10)
    batches = list(balanced_batches(labels, torch.arange(100), 20, torch.Generator().manual_seed(0)))
    assert len(batches) == 5  # 100 draws, drop_last
    share = float(torch.cat([labels[b] for b in batches]).eq(-1).double().mean())
    assert 0.35 < share < 0.65  # class-balanced, not 10 %
