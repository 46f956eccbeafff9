"""Uni-RCM scoring against a functional reference of the official inference (``uni_rcm_infer.py``).

The reference below is written in numpy from the official code, step by step: distances of L2-normalised
predicted and observed features, zeroed where the xyz feature is all zero; the residual-VQ distance with the
quantizer's own ``|z|² − 2·z·E + |e|²`` nearest-code rule; per-image max normalisation of each ORQ map;
``(cos_2d + 0.05·qe_2d)·(cos_3d + 0.10·qe_3d)``; bilinear upsampling (``align_corners=False``); and the
official smoothing/normalisations of ``models/metrics.py`` (PIL GaussianBlur(4) on a uint8 copy for the pixel
maps, 5×5/7×7 box cascade for the image score). The networks' forward is not re-derived here (it has its own
tests): the reference starts from the predicted features.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import ndimage

from mmiad.methods.unircm import UniRCM, UniRCMConfig

GRID, C2, C3 = 8, 6, 4
SMALL = {"grid_size": GRID, "hidden": 16, "num_blocks": 1, "orq_layers": 2, "device": "cpu", "seed": 3}


# ----------------------------------------------------------------------------------------- the reference
def l2_normalize(x: np.ndarray) -> np.ndarray:
    """``F.normalize(x, dim=-1)``: x / max(‖x‖, 1e-12)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def official_orq_distance(z: np.ndarray, codebooks: list[np.ndarray]) -> np.ndarray:
    """``ResidualVectorQuantizer.quantize``: per layer the nearest code by |z|² − 2·z·E + |e|², then ‖residual‖."""
    residual = z.astype(np.float64)
    for book in codebooks:
        book = book.astype(np.float64)
        squared = (residual**2).sum(1, keepdims=True) - 2 * residual @ book.T + (book**2).sum(1)[None]
        residual = residual - book[squared.argmin(1)]
    return np.sqrt((residual**2).sum(1))


def official_grid_score(
    rgb: np.ndarray,
    xyz: np.ndarray,
    rgb_pred: np.ndarray,
    xyz_pred: np.ndarray,
    books_2d: list[np.ndarray],
    books_3d: list[np.ndarray],
    *,
    beta_2d: float = 0.05,
    beta_3d: float = 0.10,
    normalize: bool = True,
) -> np.ndarray:
    """``cos_comb`` on the feature grid, as ``infer_UniRCM`` computes it (``normalize=False``: raw ORQ norms)."""
    xyz_mask = xyz.sum(-1) == 0
    cos_3d = np.sqrt(((l2_normalize(xyz_pred) - l2_normalize(xyz)) ** 2).sum(-1))
    cos_2d = np.sqrt(((l2_normalize(rgb_pred) - l2_normalize(rgb)) ** 2).sum(-1))
    cos_3d[xyz_mask] = 0.0
    cos_2d[xyz_mask] = 0.0
    qe_3d, qe_2d = official_orq_distance(xyz, books_3d), official_orq_distance(rgb, books_2d)
    qe_3d[xyz_mask] = 0.0
    qe_2d[xyz_mask] = 0.0
    if normalize:
        if qe_3d.max() > 0:
            qe_3d = qe_3d / qe_3d.max()
        if qe_2d.max() > 0:
            qe_2d = qe_2d / qe_2d.max()
    comb = (cos_2d + beta_2d * qe_2d) * (cos_3d + beta_3d * qe_3d)
    comb[xyz_mask] = 0.0
    side = round(comb.size**0.5)
    return comb.reshape(side, side)


def bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """``F.interpolate(mode="bilinear", align_corners=False)`` upsampling, separably, from its definition."""

    def weights(n_in: int) -> np.ndarray:
        source = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        frac = source - low
        matrix = np.zeros((size, n_in))
        matrix[np.arange(size), low] += 1 - frac
        matrix[np.arange(size), high] += frac
        return matrix

    rows, cols = weights(grid.shape[0]), weights(grid.shape[1])
    return rows @ grid.astype(np.float64) @ cols.T


def official_pil_blur(smap: np.ndarray) -> np.ndarray:
    """``smooth_with_gaussian_blur``: ÷ max, ToPILImage (×255, truncated to uint8), GaussianBlur(4), ÷255, × max."""
    peak = np.float32(smap.max())
    if peak <= 0:
        return smap
    quantised = (smap / peak * np.float32(255)).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(quantised, mode="L").filter(ImageFilter.GaussianBlur(radius=4)))
    return (blurred.astype(np.float32) / np.float32(255)) * peak


def official_box_cascade(smap: np.ndarray) -> np.ndarray:
    """``smooth_with_conv``: five 5×5 then three 7×7 mean filters with zero padding."""
    out = smap.astype(np.float64)
    for size, passes in ((5, 5), (7, 3)):
        for _ in range(passes):
            out = ndimage.uniform_filter(out, size=size, mode="constant", cval=0.0)
    return out


# ----------------------------------------------------------------------------------------- fixtures
def random_model(**settings: object) -> UniRCM:
    """A Uni-RCM with random networks and codebooks (the scoring does not care how they were fitted)."""
    model = UniRCM(**{**SMALL, **settings})
    model._build_networks(C2, C3)
    model.map_to_3d_.eval()
    model.map_to_2d_.eval()
    generator = torch.Generator().manual_seed(11)
    quantizers = []
    for size, channels, scale in ((16, C2, 30.0), (12, C3, 0.5)):
        quantizer = model._new_quantizer(size)
        quantizer.codebooks_ = [
            torch.randn(size, channels, generator=generator) * scale,
            torch.randn(size, channels, generator=generator) * scale * 0.3,
        ]
        quantizer.codebook_sizes = [size, size]
        quantizers.append(quantizer)
    model.orq_2d_, model.orq_3d_ = quantizers
    model.fitted_ = True
    return model


def sample(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of one sample: 2D features of scale ~30 (FPFH-like), 3D of scale ~0.5, an irregular foreground."""
    generator = torch.Generator().manual_seed(seed)
    foreground = torch.rand(GRID * GRID, generator=generator) < 0.7
    rows_2d = torch.randn(GRID * GRID, C2, generator=generator) * 30.0 * foreground[:, None]
    rows_3d = (torch.randn(GRID * GRID, C3, generator=generator) * 0.5 + 0.2) * foreground[:, None]
    return rows_2d, rows_3d, foreground


def reference_for(model: UniRCM, rows_2d: torch.Tensor, rows_3d: torch.Tensor, **options: object) -> np.ndarray:
    with torch.inference_mode():
        xyz_pred = model.map_to_3d_(rows_2d[None])[0].numpy().astype(np.float64)
        rgb_pred = model.map_to_2d_(rows_3d[None])[0].numpy().astype(np.float64)
    books_2d = [b.numpy() for b in model.orq_2d_.codebooks_]
    books_3d = [b.numpy() for b in model.orq_3d_.codebooks_]
    rgb, xyz = rows_2d.numpy().astype(np.float64), rows_3d.numpy().astype(np.float64)
    return official_grid_score(rgb, xyz, rgb_pred, xyz_pred, books_2d, books_3d, **options)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_grid_score_equals_the_official_inference(seed: int) -> None:
    model = random_model()
    rows_2d, rows_3d, foreground = sample(seed)
    expected = reference_for(model, rows_2d, rows_3d)
    maps = model.score_grids(rows_2d, rows_3d, foreground)
    np.testing.assert_allclose(maps["combined"].numpy(), expected, rtol=1e-5, atol=1e-6)
    # The paper-literal variant is a different number on features of this scale, and matches its own reference.
    paper = random_model(orq_normalization="none", beta_2d=0.1, beta_3d=0.1)
    literal = paper.score_grids(rows_2d, rows_3d, foreground)["combined"].numpy()
    raw = reference_for(paper, rows_2d, rows_3d, beta_2d=0.1, beta_3d=0.1, normalize=False)
    np.testing.assert_allclose(literal, raw, rtol=1e-5, atol=1e-6)
    assert np.abs(literal - expected).max() > np.abs(expected).max()


def test_empty_foreground_scores_zero_without_nan() -> None:
    model = random_model()
    empty = torch.zeros(GRID * GRID, dtype=torch.bool)
    maps = model.score_grids(torch.zeros(GRID * GRID, C2), torch.zeros(GRID * GRID, C3), empty)
    assert all(torch.equal(m, torch.zeros(GRID, GRID)) for m in maps.values())


def test_default_finalize_is_bilinear_then_the_papers_gaussian() -> None:
    model = random_model(image_size=64)
    grid = reference_for(model, *sample(4)[:2]).astype(np.float32)
    scored = model.finalize(torch.from_numpy(grid))
    # σ=4 Gaussian, mirror boundary, taps to 4σ (the paper's smoothing); image score = max of the map.
    expected = ndimage.gaussian_filter(bilinear(grid, 64), sigma=4.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(scored.anomaly_map.numpy(), expected, rtol=1e-5, atol=1e-6 * expected.max())
    assert scored.score == pytest.approx(float(expected.max()), rel=1e-5)
    assert scored.metric_maps == {}


def test_compat_finalize_equals_the_official_smoothing_and_normalisations() -> None:
    model = random_model(image_size=64, compat=True)
    grid = reference_for(model, *sample(5)[:2])
    # Upsampling is checked above; the uint8 step would amplify its float rounding, so both sides get one map.
    upsampled = bilinear(grid, 64).astype(np.float32)
    scored = model.finalize(torch.from_numpy(upsampled))
    blurred = official_pil_blur(upsampled)
    np.testing.assert_allclose(scored.anomaly_map.numpy(), blurred, rtol=1e-6)
    aupro_map = blurred / (blurred[blurred != 0].mean() + 1e-8)
    pixel_map = blurred / (np.sqrt(blurred.mean()) + 1e-8)
    np.testing.assert_allclose(scored.metric_maps["aupro"].numpy(), aupro_map, rtol=1e-5)
    np.testing.assert_allclose(scored.metric_maps["pixel_auroc"].numpy(), pixel_map, rtol=1e-5)
    box = official_box_cascade(upsampled)
    assert scored.score == pytest.approx(float((box / (np.sqrt(box[box != 0].mean()) + 1e-8)).max()), rel=1e-5)
    # And it really is another path than the default one.
    default = random_model(image_size=64).finalize(torch.from_numpy(upsampled))
    assert abs(default.score - scored.score) > 1e-3 * scored.score


@pytest.mark.parametrize(("compat", "normalization"), [(False, "none"), (True, "image_max")])
def test_model_files_from_before_the_option_keep_their_scoring(compat: bool, normalization: str) -> None:
    model = random_model(compat=compat, beta_2d=0.05 if compat else 0.1)
    hparams = asdict(model.config)
    del hparams["orq_normalization"]  # as written before the option existed
    config = {"method": "unircm", "hparams": hparams, "channels": [C2, C3]}
    loaded = UniRCM.from_state(config, model.state_tensors())
    assert loaded.config.orq_normalization == normalization
    assert UniRCM.from_state({**config, "hparams": asdict(UniRCMConfig(**SMALL))}, model.state_tensors()).config == (
        UniRCMConfig(**SMALL)
    )
