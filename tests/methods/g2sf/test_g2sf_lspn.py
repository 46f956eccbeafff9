"""LSPN, geometric encoding, global scale and unified score against float64 NumPy re-derivations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmiad.methods.g2sf.lspn import LSPN, GlobalScale, direction, modality_distances, pair_score

SPLIT = 5


def _np_direction(f: np.ndarray, m: np.ndarray) -> np.ndarray:
    diff = f - m
    return 5.0 * diff / np.maximum(np.sqrt((diff**2).sum(axis=1, keepdims=True)), 1e-3)


def test_direction_is_unit_over_the_concatenation_times_five() -> None:
    rng = np.random.default_rng(0)
    f, m = rng.normal(size=(7, 12)), rng.normal(size=(7, 12))
    m[0] = f[0] + 1e-5  # below the 1e-3 floor: not renormalised to length 5
    got = direction(torch.from_numpy(f), torch.from_numpy(m)).numpy()
    np.testing.assert_allclose(got, _np_direction(f, m), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(got[1:], axis=1), 5.0, rtol=1e-12)
    assert np.linalg.norm(got[0]) < 5.0
    # Global normalisation: the per-modality norms are not each 5.
    assert not np.allclose(np.linalg.norm(got[1:, :SPLIT], axis=1), 5.0)


def test_distances_match_pairwise_distance_over_mu() -> None:
    rng = np.random.default_rng(1)
    f, m = rng.normal(size=(6, 12)), rng.normal(size=(6, 12))
    mu = np.array([2.5, 0.4])
    got = modality_distances(torch.from_numpy(f), torch.from_numpy(m), SPLIT, torch.from_numpy(mu)).numpy()
    diff = f - m + 1e-6
    expected = np.stack([np.linalg.norm(diff[:, :SPLIT], axis=1), np.linalg.norm(diff[:, SPLIT:], axis=1)], 1) / mu
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    torch.testing.assert_close(
        torch.from_numpy(got[:, 0] * mu[0]),
        torch.nn.functional.pairwise_distance(torch.from_numpy(f[:, :SPLIT]), torch.from_numpy(m[:, :SPLIT])),
    )


def test_global_scale_formula_and_official_sigma_values() -> None:
    scale = GlobalScale()
    torch.testing.assert_close(scale(), torch.tensor([0.5, 0.5]))
    # Fact sheet §10: θ of the official bagel and tire checkpoints → σ_IMG 0.917 / 0.789.
    for theta, sigma_img in (((0.768, -1.261), 0.917), ((0.522, -0.698), 0.789)):
        with torch.no_grad():
            scale.theta.copy_(torch.tensor(theta).view(2, 1))
        g = [0.5 * (math.tanh(t) + 1) for t in theta]
        assert float(scale().detach()[0]) == pytest.approx(g[0] / sum(g), rel=1e-6)
        assert float(scale().detach()[0]) == pytest.approx(sigma_img, abs=1e-3)


def _np_lspn(net: LSPN, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    def weights(module: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray]:
        return module.weight.detach().double().numpy(), module.bias.detach().double().numpy()

    def branch(b: torch.nn.Module, x: np.ndarray) -> np.ndarray:
        w0, b0 = weights(b.network[0].linear)
        w1, b1 = weights(b.network[1].linear)
        return np.maximum(x @ w0.T + b0, 0) @ w1.T + b1

    joint = np.concatenate([branch(net.residual_transformer, d), branch(net.transformer, m)], axis=1)
    w0, b0 = weights(net.regressor[0])
    w3, b3 = weights(net.regressor[3])
    return np.exp(np.tanh(np.maximum(joint @ w0.T + b0, 0) @ w3.T + b3))


def test_lspn_architecture_state_keys_and_forward() -> None:
    torch.manual_seed(0)
    net = LSPN(1920).eval()
    assert sum(p.numel() for p in net.parameters()) == 2_164_738  # fact sheet §3.2
    assert set(net.state_dict()) == {
        *(
            f"{b}.network.{i}.linear.{k}"
            for b in ("residual_transformer", "transformer")
            for i in (0, 1)
            for k in ("weight", "bias")
        ),
        *(f"regressor.{i}.{k}" for i in (0, 3) for k in ("weight", "bias")),
    }
    small = LSPN(12, 6, 4).double().eval()
    rng = np.random.default_rng(2)
    d, m = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    got = small(torch.from_numpy(d), torch.from_numpy(m)).detach().numpy()
    np.testing.assert_allclose(got, _np_lspn(small, d, m), rtol=1e-10)
    assert (got > math.exp(-1)).all() and (got < math.e).all()


def test_unified_score_against_float64_rederivation_with_background() -> None:
    torch.manual_seed(3)
    net = LSPN(12, 6, 4).double().eval()
    rng = np.random.default_rng(3)
    f, m = rng.normal(size=(8, 12)), rng.normal(size=(8, 12))
    mu = np.array([1.7, 0.3])
    sigma = np.array([0.8, 0.2])
    background = np.zeros(8, bool)
    background[[1, 4]] = True
    score, w, _ = pair_score(
        net,
        torch.from_numpy(sigma),
        torch.from_numpy(f),
        torch.from_numpy(m),
        SPLIT,
        torch.from_numpy(mu),
        torch.from_numpy(background),
    )
    weights = _np_lspn(net, _np_direction(f, m), m)
    weights[background] = 1.0
    diff = f - m + 1e-6
    dist = np.stack([np.linalg.norm(diff[:, :SPLIT], axis=1), np.linalg.norm(diff[:, SPLIT:], axis=1)], 1) / mu
    expected = (sigma * weights * dist).sum(axis=1)
    np.testing.assert_allclose(score.detach().numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(w.detach().numpy()[background], 1.0)
