"""PRO curves and AUPRO against hand-computed values and an independent brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mmiad.metrics import (
    AUPRO_LIMITS,
    PAPER_AUPRO_THRESHOLDS,
    PixelScores,
    aupro,
    aupro_key,
    aupro_many,
    aupro_protocol,
    category_metrics,
    pro_curve,
    trapezoid_to,
)
from mmiad.metrics.pro import _exact_curve


def two_region_case(tied: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two images, two GT regions of different sizes, four normal pixels.

    Image 0 (1×3): region R1 = 1 pixel scored 0.9; normal pixels 0.1, 0.2.
    Image 1 (1×5): region R2 = 3 pixels scored 0.8, 0.35 (0.3 when ``tied``), 0.05; normal pixels 0.3, 0.4.
    """
    masks = [np.array([[True, False, False]]), np.array([[True, True, True, False, False]])]
    middle = 0.3 if tied else 0.35
    maps = [np.array([[0.9, 0.1, 0.2]]), np.array([[0.8, middle, 0.05, 0.3, 0.4]])]
    return masks, maps


def test_exact_curve_by_hand() -> None:
    masks, maps = two_region_case()
    fpr, pro = pro_curve(masks, maps)
    # Descending scores; each normal pixel adds 1/4 FPR, an R1 pixel adds 1/(2·1), an R2 pixel 1/(2·3):
    # 0.9 (R1) -> (0, 1/2); 0.8 (R2) -> (0, 2/3); 0.4 -> (1/4, 2/3); 0.35 (R2) -> (1/4, 5/6); 0.3 -> (1/2, 5/6);
    # 0.2 -> (3/4, 5/6); 0.1 -> (1, 5/6); 0.05 (R2) -> (1, 1); framed by (0, 0) and (1, 1).
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.25, 0.25, 0.5, 0.75, 1, 1, 1])
    np.testing.assert_allclose(pro, [0, 1 / 2, 2 / 3, 2 / 3, 5 / 6, 5 / 6, 5 / 6, 5 / 6, 1, 1])


def test_exact_aupro_by_hand_region_weighting() -> None:
    masks, maps = two_region_case()
    # Area to FPR 0.5: 0.25·2/3 + 0.25·5/6 = 9/24, divided by 0.5 -> 0.75.
    assert aupro(masks, maps, 0.5) == pytest.approx(0.75, abs=1e-12)
    # Pixel-weighted PRO (1/4 per anomalous pixel) would give 0.25·1/2 + 0.25·3/4 = 5/16 / 0.5 = 0.625 instead:
    # the small region R1 counts as much as the large R2.
    assert aupro(masks, maps, 0.5) != pytest.approx(0.625, abs=1e-3)


def test_exact_aupro_interpolates_at_limit() -> None:
    masks, maps = two_region_case()
    # Up to 0.25 at PRO 2/3 -> 1/6; the next segment is flat at 5/6 from (1/4, 5/6) to (1/2, 5/6), so
    # 0.05·5/6 = 1/24 more. (1/6 + 1/24) / 0.3 = (5/24) / 0.3.
    assert aupro(masks, maps, 0.3) == pytest.approx((5 / 24) / 0.3, abs=1e-12)


def test_exact_tied_scores_keep_only_last_point() -> None:
    masks, maps = two_region_case(tied=True)
    fpr, pro = pro_curve(masks, maps)
    # The normal 0.3 and the R2 pixel 0.3 form one point (1/2, 5/6): the curve goes diagonally from (1/4, 2/3).
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1])
    np.testing.assert_allclose(pro, [0, 1 / 2, 2 / 3, 2 / 3, 5 / 6, 5 / 6, 5 / 6, 1, 1])
    # PRO at 0.3 interpolated on the diagonal: 2/3 + (1/6)·(0.05/0.25) = 0.7.
    # Area: 0.25·2/3 + 0.05·(2/3 + 0.7)/2 = 200/1200 + 41/1200 = 241/1200; divided by 0.3 -> 241/360.
    assert aupro(masks, maps, 0.3) == pytest.approx(241 / 360, abs=1e-12)


def test_compat_by_hand_differs_from_exact() -> None:
    masks, maps = two_region_case()
    # Normal scores sorted [0.1, 0.2, 0.3, 0.4]; positions linspace(0, 3, 3) -> [0, 1, 3], thresholds
    # [0.1, 0.2, 0.4]; FPR = 1 - (pos+1)/4 = [0.75, 0.5, 0]. PRO (score > thr): R1 always 1, R2 2/3, 2/3, 1/3
    # -> [5/6, 5/6, 2/3]. Prefix (1, 1), reversed: fpr [0, 0.5, 0.75, 1], pro [2/3, 5/6, 5/6, 1].
    fpr, pro = pro_curve(masks, maps, mode="compat", num_thresholds=3)
    np.testing.assert_allclose(fpr, [0, 0.5, 0.75, 1])
    np.testing.assert_allclose(pro, [2 / 3, 5 / 6, 5 / 6, 1])
    # PRO at 0.3 on the diagonal to (0.5, 5/6): 2/3 + (1/6)·0.6 = 23/30; area 0.3·(2/3 + 23/30)/2 = 0.215.
    compat = aupro(masks, maps, 0.3, mode="compat", num_thresholds=3)
    assert compat == pytest.approx(0.215 / 0.3, abs=1e-12)
    assert compat - aupro(masks, maps, 0.3) == pytest.approx(0.215 / 0.3 - (5 / 24) / 0.3, abs=1e-12)


def test_compat_counts_strictly_above_threshold() -> None:
    masks, maps = two_region_case(tied=True)
    # Thresholds = all normal scores [0.1, 0.2, 0.3, 0.4], FPR [0.75, 0.5, 0.25, 0]. At 0.3 the tied R2 pixel
    # (0.3) does not count (score > thr): R2 = {0.8} -> 1/3, PRO (1 + 1/3)/2 = 2/3. At 0.4: also 2/3.
    # At 0.2 and 0.1: R2 = {0.8, 0.3} -> 2/3, PRO 5/6.
    fpr, pro = pro_curve(masks, maps, mode="compat", num_thresholds=4)
    np.testing.assert_allclose(fpr, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(pro, [2 / 3, 2 / 3, 5 / 6, 5 / 6, 1])
    # 0.25·2/3, then the diagonal to (0.5, 5/6) interpolated at 0.3 to 0.7: 0.05·(2/3 + 0.7)/2.
    # (241/1200) / 0.3 = 241/360, here the same value as the exact curve (test_exact_tied_scores_...).
    # Counting ">= thr" instead would give PRO 5/6 at FPR 0.25 and a larger area.
    assert aupro(masks, maps, 0.3, mode="compat", num_thresholds=4) == pytest.approx(241 / 360, abs=1e-12)


def test_compat_approaches_exact_with_many_thresholds() -> None:
    rng = np.random.default_rng(3)
    masks = [np.zeros((20, 20), dtype=bool) for _ in range(6)]
    for mask in masks[:4]:
        row, col = rng.integers(0, 15, 2)
        mask[row : row + rng.integers(1, 6), col : col + rng.integers(1, 6)] = True
    maps = [rng.random((20, 20)) + 0.6 * mask for mask in masks]
    n_ok = PixelScores.from_maps(masks, maps).ok_sorted.size
    exact = aupro(masks, maps, 0.3)
    dense = aupro(masks, maps, 0.3, mode="compat", num_thresholds=n_ok)
    # With no ties and every normal score a threshold, compat joins the tops of the exact curve's vertical steps
    # by straight lines: it can only exceed exact, by at most half a 1/n_ok-wide column per unit of PRO.
    assert 0.0 <= dense - exact <= 0.5 / (n_ok * 0.3)
    sparse = aupro(masks, maps, 0.3, mode="compat", num_thresholds=5)
    assert abs(sparse - exact) > abs(dense - exact)


def official_exact_curve(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A direct (slow) transcription of the official algorithm's description: arg-sort of all pixels."""
    fp_steps, pro_steps, scores, n_regions = [], [], [], 0
    for mask, amap in zip(masks, maps, strict=True):
        labelled, n_here = ndimage.label(mask, structure=np.ones((3, 3)))
        pro_step = np.zeros(mask.shape)
        for k in range(1, n_here + 1):
            pro_step[labelled == k] = 1.0 / np.count_nonzero(labelled == k)
        n_regions += n_here
        fp_steps.append((labelled == 0).ravel())
        pro_steps.append(pro_step.ravel())
        scores.append(amap.ravel().astype(np.float32))
    fp, pro_w, score = np.concatenate(fp_steps), np.concatenate(pro_steps), np.concatenate(scores)
    order = np.argsort(-score, kind="stable")
    fpr = np.cumsum(fp[order]) / fp.sum()
    pro = np.cumsum(pro_w[order]) / n_regions
    last_of_ties = np.append(np.diff(score[order]) != 0, True)
    fpr, pro = np.minimum(fpr[last_of_ties], 1), np.minimum(pro[last_of_ties], 1)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


@pytest.mark.parametrize("seed", range(8))
def test_exact_matches_brute_force_reference_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = [rng.random((7, 9)) < 0.15 for _ in range(4)]
    # Coarse integer scores create many ties, also between normal and anomalous pixels.
    maps = [np.round(rng.random((7, 9)) * 6) + 2 * mask * rng.integers(0, 2) for mask in masks]
    fpr, pro = pro_curve(masks, maps)
    ref_fpr, ref_pro = official_exact_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    # The early-stopped curve used for AUPRO integrates to the same value as the full curve.
    pixels = PixelScores.from_maps(masks, maps)
    for limit in (0.01, 0.05, 0.3, 0.7):
        short_fpr, short_pro = _exact_curve(pixels, max_fpr=limit)
        assert short_fpr.size <= fpr.size
        full = trapezoid_to(fpr, pro, limit)
        assert trapezoid_to(short_fpr, short_pro, limit) == pytest.approx(full, abs=1e-12)


def test_eight_connectivity_joins_diagonal_pixels() -> None:
    # The two anomalous pixels touch diagonally: one region of 2 under 8-connectivity (two regions under 4).
    masks = [np.array([[True, False, False], [False, True, False]])]
    maps = [np.array([[0.9, 0.1, 0.2], [0.3, 0.5, 0.4]])]
    _, pro = pro_curve(masks, maps)
    # One region: each anomalous pixel adds 1/2. 0.9 -> (0, 1/2); 0.5 -> (0, 1); then the normal pixels.
    np.testing.assert_allclose(pro[:3], [0, 0.5, 1.0])
    assert PixelScores.from_maps(masks, maps).n_regions == 1


@pytest.mark.parametrize("mode", ["exact", "compat"])
def test_perfect_and_inverted_maps(mode: str) -> None:
    masks = [np.zeros((4, 5), bool), np.zeros((4, 5), bool)]
    masks[1][1:3, 1:4] = True
    masks[1][0, 4] = True  # a second, 1-pixel region
    perfect = [mask.astype(np.float32) for mask in masks]
    inverted = [1.0 - mask.astype(np.float32) for mask in masks]
    # Sums of 1/region_size weights may round a hair below 1.
    assert aupro_many(masks, perfect, (0.3, 0.01), mode=mode) == pytest.approx({0.3: 1.0, 0.01: 1.0}, abs=1e-12)
    assert aupro_many(masks, inverted, (0.3, 0.01), mode=mode) == pytest.approx({0.3: 0.0, 0.01: 0.0}, abs=1e-12)


def test_aupro_many_matches_single_limits() -> None:
    masks, maps = two_region_case(tied=True)
    many = aupro_many(masks, maps, (0.3, 0.01, 0.5))
    for limit, value in many.items():
        assert value == pytest.approx(aupro(masks, maps, limit), abs=1e-12)
    assert set(many) == {0.3, 0.01, 0.5}


def test_trapezoid_to_by_hand() -> None:
    x, y = np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.0])
    assert trapezoid_to(x, y, 0.25) == pytest.approx(0.5 * 0.25 * 0.5)  # triangle up to y = 0.5
    # A vertical step at x = 0.5: interpolation starts from the last point there (y = 1).
    x, y = np.array([0.0, 0.5, 0.5, 1.0]), np.array([0.0, 0.5, 1.0, 1.0])
    assert trapezoid_to(x, y, 0.5) == pytest.approx(0.125)
    assert trapezoid_to(x, y, 0.75) == pytest.approx(0.125 + 0.25)
    with pytest.raises(ValueError, match="beyond"):
        trapezoid_to(np.array([0.0, 0.5]), np.array([0.0, 1.0]), 0.75)


def test_bad_inputs_raise_clear_errors() -> None:
    good = [np.zeros((3, 3), bool)]
    with pytest.raises(ValueError, match="no anomalous pixel"):
        aupro(good, [np.ones((3, 3))])
    masks, maps = two_region_case()
    with pytest.raises(ValueError, match="anomaly map 1 has shape"):
        aupro(masks, [maps[0], maps[1][:, :4]])
    nan_maps = [maps[0], maps[1].copy()]
    nan_maps[1][0, 2] = np.nan
    with pytest.raises(ValueError, match="anomaly map 1 contains NaN"):
        aupro(masks, nan_maps)
    with pytest.raises(ValueError, match="FPR limit"):
        aupro(masks, maps, 0.0)
    with pytest.raises(ValueError, match="unknown AUPRO mode"):
        aupro(masks, maps, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 ground-truth masks but 1"):
        aupro(masks, maps[:1])


def sampled_curve_by_brute_force(
    masks: list[np.ndarray], maps: list[np.ndarray], num_thresholds: int
) -> tuple[np.ndarray, np.ndarray]:
    """The repositories' sampled curve from its description, counting every region's pixels above each threshold."""
    ok_scores, regions = [], []
    for mask, amap in zip(masks, maps, strict=True):
        labelled, n_here = ndimage.label(mask, structure=np.ones((3, 3)))
        ok_scores.append(amap[labelled == 0])
        regions += [amap[labelled == k] for k in range(1, n_here + 1)]
    ok = np.sort(np.concatenate(ok_scores))
    fprs, pros = [1.0], [1.0]
    for position in np.linspace(0, ok.size - 1, num=num_thresholds, dtype=int):
        fprs.append(1.0 - (position + 1) / ok.size)
        pros.append(float(np.mean([np.mean(region > ok[position]) for region in regions])))
    return np.array(fprs[::-1]), np.array(pros[::-1])


def area_to_by_loop(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoids one by one up to ``limit``; the last ends at y interpolated from the last point at x <= limit."""
    area = 0.0
    for i in range(1, x.size):
        if x[i] <= limit:
            area += 0.5 * (y[i] + y[i - 1]) * (x[i] - x[i - 1])
            continue
        if x[i - 1] < limit:
            y_limit = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
            area += 0.5 * (y_limit + y[i - 1]) * (limit - x[i - 1])
        break
    return area / limit


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("mode", "num_thresholds"), [("exact", 99), ("compat", 99), ("compat", 100)])
def test_every_reported_limit_matches_brute_force(seed: int, mode: str, num_thresholds: int) -> None:
    rng = np.random.default_rng(seed)
    masks = [rng.random((12, 15)) < 0.12 for _ in range(5)]
    maps = [np.round(rng.random((12, 15)) * 40) / 40 + 0.3 * mask * rng.random((12, 15)) for mask in masks]
    if mode == "exact":
        fpr, pro = official_exact_curve(masks, maps)
    else:
        fpr, pro = sampled_curve_by_brute_force(masks, maps, num_thresholds)
    labels = [int(mask.any()) for mask in masks]
    result = category_metrics(
        labels, [m.max() for m in maps], masks, maps, aupro_mode=mode, num_thresholds=num_thresholds
    )
    values = [result[aupro_key(limit)] for limit in AUPRO_LIMITS]
    assert [aupro_key(limit) for limit in AUPRO_LIMITS] == ["aupro@0.3", "aupro@0.1", "aupro@0.05", "aupro@0.01"]
    np.testing.assert_allclose(values, [area_to_by_loop(fpr, pro, limit) for limit in AUPRO_LIMITS], atol=1e-12)
    assert len({round(v, 9) for v in values}) == 4  # the limits really give four different numbers here


def test_protocol_picks_each_papers_sampled_aupro_under_compat() -> None:
    assert PAPER_AUPRO_THRESHOLDS == {"cfm": 99, "unircm": 99, "m3dm": 100, "btf": 100}
    assert [aupro_protocol(m, True) for m in ("cfm", "unircm", "m3dm", "btf")] == [
        ("compat", 99),
        ("compat", 99),
        ("compat", 100),
        ("compat", 100),
    ]
    assert aupro_protocol("m3dm", False) == ("exact", 100)  # the count is unused by the exact curve
    # Explicit choices win; a sampled curve without a count takes the method's.
    assert aupro_protocol("btf", True, mode="exact") == ("exact", 100)
    assert aupro_protocol("btf", False, mode="compat") == ("compat", 100)
    assert aupro_protocol("cfm", True, num_thresholds=50) == ("compat", 50)
    assert aupro_protocol("other", True) == ("compat", 99)
    with pytest.raises(ValueError, match="unknown AUPRO mode"):
        aupro_protocol("cfm", False, mode="sampled")  # type: ignore[arg-type]
