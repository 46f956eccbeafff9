"""Per-region-overlap (PRO) curves and the normalised area under them (AUPRO).

Two variants exist and give different numbers, so both are here:

* ``"exact"`` (default) follows the official MVTec evaluation: a curve point at every distinct score. Each normal
  pixel above the threshold adds 1/n_ok to the FPR; each anomalous pixel adds 1/(n_regions·region_size) to the
  PRO, so a small defect counts as much as a large one.
* ``"compat"`` reproduces what the BTF, M3DM and CFM repositories compute (and what their papers report):
  ``num_thresholds`` thresholds sampled from the sorted normal scores (100 in BTF/M3DM, 99 in CFM), the FPR taken
  from the threshold's *position* (ties ignored) and the overlap counted with a strict ``score > threshold``.
  With ~99 thresholds the FPR grid step is ~0.01, so AUPRO@1% is a single interpolated segment.

Both are integrated with the same trapezoid rule up to the FPR limit (linearly interpolating the PRO at the
limit) and divided by the limit, so a perfect detector scores 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from mmiad.metrics.pixels import PixelScores

AuproMode = Literal["exact", "compat"]
DEFAULT_LIMITS = (0.3, 0.01)
# Thresholds of the sampled AUPRO in each method's official evaluation (CFM's and Uni-RCM's
# ``utils/metrics_utils.py``: 99; BTF's and M3DM's ``utils/au_pro_util.py``: 100).
PAPER_AUPRO_THRESHOLDS = {"cfm": 99, "unircm": 99, "m3dm": 100, "btf": 100}


def _group_starts(ascending: np.ndarray) -> np.ndarray:
    """Index of the first element of every run of equal values in an ascending array."""
    if ascending.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(([0], np.flatnonzero(ascending[1:] != ascending[:-1]) + 1))


def _exact_curve(pixels: PixelScores, max_fpr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The official exact PRO curve, optionally stopped early once the FPR has passed ``max_fpr``.

    The curve has one point per distinct score of the union of normal and anomalous pixels (descending score).
    Because the normal scores are already sorted, the FPR at a threshold ``t`` is a position in that array and
    the PRO is a suffix sum over the (few) sorted anomalous pixels, so no arg-sort over all pixels is needed.
    Stopping early keeps only the thresholds down to the first normal score whose FPR exceeds ``max_fpr``: a
    prefix of the full curve, enough to integrate (and interpolate) up to ``max_fpr``.
    """
    pixels.require_both_classes("the PRO curve")
    ok = pixels.ok_sorted
    n_ok = ok.size
    order = np.argsort(pixels.anomalous, kind="stable")
    an = pixels.anomalous[order]
    weights = 1.0 / pixels.region_sizes[pixels.region[order]]
    # tail[i] = total PRO weight of anomalous pixels i.. (score >= an[i]), summed from the top score down.
    tail = np.zeros(an.size + 1)
    tail[:-1] = np.cumsum(weights[::-1])[::-1]

    lo = an_lo = 0
    cap = int(np.floor(max_fpr * n_ok)) + 1  # one spare count guards against rounding in max_fpr * n_ok
    if cap < n_ok:
        # The first normal score (from the top) whose FPR exceeds the cap ends the needed prefix.
        stop = ok[n_ok - cap - 1]
        lo = int(np.searchsorted(ok, stop, side="left"))
        an_lo = int(np.searchsorted(an, stop, side="left"))
    ok_part = ok[lo:]
    starts = _group_starts(ok_part)
    t_ok = ok_part[starts]
    count_ok = n_ok - (lo + starts)
    weight_ok = tail[np.searchsorted(an, t_ok, side="left")]

    an_starts = _group_starts(an[an_lo:]) + an_lo
    t_an = an[an_starts]
    weight_an = tail[an_starts]
    count_an = n_ok - np.searchsorted(ok, t_an, side="left")
    # Scores present among both normal and anomalous pixels already have their point; insert the others in order.
    at = np.searchsorted(t_ok, t_an, side="left")
    new = (at >= t_ok.size) | (t_ok[np.minimum(at, t_ok.size - 1)] != t_an)
    count = np.insert(count_ok, at[new], count_an[new])
    weight = np.insert(weight_ok, at[new], weight_an[new])

    fpr = np.minimum(count[::-1] / n_ok, 1.0)
    pro = np.minimum(weight[::-1] / pixels.n_regions, 1.0)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def _compat_curve(pixels: PixelScores, num_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampled-threshold curve of the BTF / M3DM / CFM repositories, in increasing FPR."""
    pixels.require_both_classes("the PRO curve")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    ok = pixels.ok_sorted
    n_ok = ok.size
    positions = np.floor(np.linspace(0, n_ok - 1, num_thresholds)).astype(np.int64)
    thresholds = ok[positions]
    overlap_sum = np.zeros(num_thresholds)
    order = np.lexsort((pixels.anomalous, pixels.region))
    scores_by_region = np.split(pixels.anomalous[order], np.cumsum(pixels.region_sizes)[:-1])
    for scores in scores_by_region:
        not_above = np.searchsorted(scores, thresholds, side="right")
        overlap_sum += 1.0 - not_above / scores.size
    fpr = 1.0 - (positions + 1) / n_ok
    pro = overlap_sum / pixels.n_regions
    # The repositories prepend (1, 1) and then reverse the lists, giving increasing FPR.
    return np.concatenate((fpr[::-1], [1.0])), np.concatenate((pro[::-1], [1.0]))


def _curve(pixels: PixelScores, mode: AuproMode, num_thresholds: int, max_fpr: float) -> tuple[np.ndarray, np.ndarray]:
    if mode == "exact":
        return _exact_curve(pixels, max_fpr)
    if mode == "compat":
        return _compat_curve(pixels, num_thresholds)
    raise ValueError(f"unknown AUPRO mode {mode!r}; expected 'exact' or 'compat'")


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` from ``x[0]`` to ``x_max``, interpolating ``y`` linearly at ``x_max``.

    ``x`` must be non-decreasing; repeated ``x`` values (vertical steps) add no area. At a repeated ``x`` the
    interpolation starts from the *last* point with that ``x``, as the official ``bisect``-based rule does.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size == 0 or x_max < x[0]:
        raise ValueError(f"FPR limit {x_max} lies before the start of the curve")
    end = int(np.searchsorted(x, x_max, side="right"))  # points [0, end) have x <= x_max
    xs, ys = x[:end], y[:end]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if xs[-1] < x_max:
        if end >= x.size:
            raise ValueError(f"FPR limit {x_max} lies beyond the end of the curve ({x[-1]})")
        slope = (y[end] - ys[-1]) / (x[end] - xs[-1])
        y_at_limit = ys[-1] + slope * (x_max - xs[-1])
        area += float(0.5 * (ys[-1] + y_at_limit) * (x_max - xs[-1]))
    return area


def _check_limits(limits: Iterable[float]) -> tuple[float, ...]:
    limits = tuple(float(limit) for limit in limits)
    if not limits:
        raise ValueError("no FPR limit given")
    for limit in limits:
        if not 0.0 < limit <= 1.0:
            raise ValueError(f"FPR limit must be in (0, 1], got {limit}")
    return limits


def aupro_many_from(
    pixels: PixelScores,
    limits: Iterable[float] = DEFAULT_LIMITS,
    *,
    mode: AuproMode = "exact",
    num_thresholds: int = 99,
) -> dict[float, float]:
    """AUPRO at several FPR limits from one curve of pooled pixels (see :func:`aupro_many`)."""
    limits = _check_limits(limits)
    fpr, pro = _curve(pixels, mode, num_thresholds, max(limits))
    return {limit: float(trapezoid_to(fpr, pro, limit) / limit) for limit in limits}


def pro_curve(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    *,
    mode: AuproMode = "exact",
    num_thresholds: int = 99,
) -> tuple[np.ndarray, np.ndarray]:
    """The full PRO curve ``(fpr, pro)`` in increasing FPR, e.g. for plotting.

    Args:
        masks: H×W ground-truth masks (non-zero = anomalous); components use 8-connectivity.
        maps: H×W anomaly maps of the same shapes.
        mode: ``"exact"`` (official MVTec evaluation) or ``"compat"`` (BTF/M3DM/CFM sampled thresholds).
        num_thresholds: Number of sampled thresholds in compat mode (99 in CFM, 100 in BTF/M3DM).

    Raises:
        ValueError: shape mismatch (naming the index), NaN scores, or no anomalous / no normal pixel at all.
    """
    return _curve(PixelScores.from_maps(masks, maps), mode, num_thresholds, 1.0)


def aupro_many(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    limits: Iterable[float] = DEFAULT_LIMITS,
    *,
    mode: AuproMode = "exact",
    num_thresholds: int = 99,
) -> dict[float, float]:
    """Normalised AUPRO at each FPR limit, all from one PRO curve: ``{limit: area(0..limit) / limit}``."""
    return aupro_many_from(PixelScores.from_maps(masks, maps), limits, mode=mode, num_thresholds=num_thresholds)


def aupro(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    *,
    mode: AuproMode = "exact",
    num_thresholds: int = 99,
) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (1.0 for a perfect detector)."""
    return aupro_many(masks, maps, (fpr_limit,), mode=mode, num_thresholds=num_thresholds)[float(fpr_limit)]


def aupro_protocol(
    method: str, compat: bool, *, mode: AuproMode | None = None, num_thresholds: int | None = None
) -> tuple[AuproMode, int]:
    """The AUPRO variant and threshold count a run's metrics use.

    A run scored the official way (``compat``) is measured as its paper measured it: the sampled variant with
    the method's own threshold count (:data:`PAPER_AUPRO_THRESHOLDS`); otherwise the exact curve. An explicit
    ``mode`` or ``num_thresholds`` wins; a sampled curve without a count uses the method's (99 if unknown).
    """
    chosen: AuproMode = mode if mode is not None else ("compat" if compat else "exact")
    if chosen not in ("exact", "compat"):
        raise ValueError(f"unknown AUPRO mode {chosen!r}; expected 'exact' or 'compat'")
    count = num_thresholds if num_thresholds is not None else PAPER_AUPRO_THRESHOLDS.get(method, 99)
    return chosen, count
