"""CMDR-IAD's scoring, every step against an independent float64 NumPy re-derivation of the official inference."""

from __future__ import annotations

import math

import numpy as np
import torch

from mmiad.methods.cfm.mapping import feature_discrepancy
from mmiad.methods.cmdr import scoring


def box_numpy(image: np.ndarray, size: int, repeats: int) -> np.ndarray:
    """Size×size mean over a zero-padded window (divisor size² everywhere), ``repeats`` times."""
    r = size // 2
    for _ in range(repeats):
        padded = np.pad(image, r)
        out = np.zeros_like(image)
        for dy in range(size):
            for dx in range(size):
                out += padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
        image = out / size**2
    return image


def gate_numpy(map_2d: np.ndarray, map_3d: np.ndarray) -> np.ndarray:
    joint = map_2d * map_3d
    sigma = np.sqrt(box_numpy((joint - joint.mean()) ** 2, 7, 1))  # AvgPool2d(7, 1, 3), zero padding counted
    weight = 4.0 + 2.0 * sigma / (sigma.mean() + 1e-8)
    return joint / (1.0 + np.exp(-weight * joint))


def a_rec_numpy(rec_2d_smoothed: np.ndarray, rec_3d: np.ndarray) -> np.ndarray:
    w2, w3 = np.exp(-0.3 * rec_2d_smoothed), np.exp(-0.3 * rec_3d)
    return (w2 * rec_2d_smoothed + w3 * rec_3d) / (w2 + w3 + 1e-8)


def official_numpy(
    maps: dict[str, np.ndarray], foreground: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """inference.py L147-197: (image score, smoothed Ψ, AUPRO map, P-AUROC map)."""
    masked = {k: np.where(foreground, v, 0.0) for k, v in maps.items()}
    rec_2d = box_numpy(box_numpy(masked["rec_2d"], 5, 3), 7, 2)
    psi = gate_numpy(masked["map_2d"], masked["map_3d"]) * a_rec_numpy(rec_2d, masked["rec_3d"])
    psi = np.where(foreground, psi, 0.0)
    psi = box_numpy(box_numpy(psi, 5, 5), 7, 3)
    nonzero = psi[psi != 0].mean()
    return float((psi / np.sqrt(nonzero)).max()), psi, psi / nonzero, psi / np.sqrt(psi.mean())


def random_maps(size: int = 40, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    foreground = (yy - size / 2) ** 2 + (xx - size / 2.3) ** 2 < (size / 3) ** 2
    maps = {k: rng.uniform(0, 2, (size, size)) for k in ("map_2d", "map_3d", "rec_2d", "rec_3d")}
    return {k: np.where(foreground, v, 0.0) for k, v in maps.items()}, foreground


def t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float()


def test_sheet_sanity_values() -> None:
    """d_rec2d = 0.5, d_rec3d = 1.0 → A_rec = 0.7313; joint = 0.25 with W = 4 → A_map = 0.1828 (W = 6 → 0.2044)."""
    a_rec = scoring.confident_reconstruction(torch.tensor(0.5), torch.tensor(1.0))
    assert round(float(a_rec), 4) == 0.7313
    assert round(a_rec_numpy(np.array(0.5), np.array(1.0)).item(), 4) == 0.7313
    # A spatially constant joint map has σ_local = 0 away from the border, so W = 4 there (and W·joint = 1).
    constant = torch.full((21, 21), 0.5)
    a_map = scoring.gated_mapping_anomaly(constant, constant)
    assert round(float(a_map[10, 10]), 4) == 0.1828
    assert round(0.25 / (1 + math.exp(-6 * 0.25)), 4) == 0.2044


def test_distance_is_normalised_euclidean() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    expected = np.linalg.norm(
        a / np.linalg.norm(a, axis=1, keepdims=True) - b / np.linalg.norm(b, axis=1, keepdims=True), axis=1
    )
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(expected, np.sqrt(2 - 2 * cosine), atol=1e-12)  # the sheet's sqrt(2 − 2cos)
    np.testing.assert_allclose(feature_discrepancy(t(a), t(b)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_box_pre_smoothing() -> None:
    maps, _ = random_maps(seed=2)
    expected = box_numpy(box_numpy(maps["rec_2d"], 5, 3), 7, 2)
    np.testing.assert_allclose(
        scoring.smooth(t(maps["rec_2d"]), scoring.REC2D_PASSES).numpy(), expected, rtol=1e-4, atol=1e-6
    )


def test_gate_against_numpy() -> None:
    maps, _ = random_maps(seed=3)
    got = scoring.gated_mapping_anomaly(t(maps["map_2d"]), t(maps["map_3d"])).numpy()
    np.testing.assert_allclose(got, gate_numpy(maps["map_2d"], maps["map_3d"]), rtol=1e-4, atol=1e-6)


def test_confidence_weights_down_weight_the_larger_error() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0, 2, (30, 30)), rng.uniform(0, 2, (30, 30))
    np.testing.assert_allclose(scoring.confident_reconstruction(t(a), t(b)).numpy(), a_rec_numpy(a, b), rtol=1e-5)
    assert float(scoring.confident_reconstruction(torch.tensor(0.0), torch.tensor(2.0))) < 1.0  # below the mean


def test_fused_score_and_maps_against_numpy() -> None:
    maps, foreground = random_maps(seed=5)
    psi = scoring.fused_map(
        *(t(maps[k]) for k in ("map_2d", "map_3d", "rec_2d", "rec_3d")), torch.from_numpy(foreground)
    )
    scored = scoring.finalize(psi)
    score, smoothed, aupro, pixel = official_numpy(maps, foreground)
    np.testing.assert_allclose(scored.anomaly_map.numpy(), smoothed, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(scored.metric_maps["aupro"].numpy(), aupro, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scored.metric_maps["pixel_auroc"].numpy(), pixel, rtol=1e-4, atol=1e-6)
    assert math.isclose(scored.score, score, rel_tol=1e-4)
    assert math.isclose(
        scored.score, float(scored.anomaly_map.max()) / math.sqrt(smoothed[smoothed != 0].mean()), rel_tol=1e-4
    )


def test_xyz_only_against_numpy() -> None:
    """The official 3D-only script: masked d_rec3d, one 5×5 box, ÷ (sqrt(mean of non-zero) + 1e-6), max."""
    maps, _ = random_maps(seed=6)
    smoothed = box_numpy(maps["rec_3d"], 5, 1)
    expected = smoothed / (np.sqrt(smoothed[smoothed != 0].mean()) + 1e-6)
    scored = scoring.xyz_only(t(maps["rec_3d"]))
    np.testing.assert_allclose(scored.anomaly_map.numpy(), expected, rtol=1e-4, atol=1e-7)
    assert math.isclose(scored.score, expected.max(), rel_tol=1e-4) and scored.metric_maps == {}


def test_rgb_only_is_the_fused_path_without_gate_and_3d_term() -> None:
    maps, foreground = random_maps(seed=7)
    rec_2d = np.where(foreground, box_numpy(box_numpy(maps["rec_2d"], 5, 3), 7, 2), 0.0)
    psi = box_numpy(box_numpy(rec_2d, 5, 5), 7, 3)
    scored = scoring.finalize(scoring.rgb_only_map(t(maps["rec_2d"]), torch.from_numpy(foreground)))
    np.testing.assert_allclose(scored.anomaly_map.numpy(), psi, rtol=1e-4, atol=1e-7)
    assert math.isclose(scored.score, psi.max() / math.sqrt(psi[psi != 0].mean()), rel_tol=1e-4)
