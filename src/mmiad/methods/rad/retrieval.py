"""RAD's two retrieval levels and its map/score rules, as pure tensor functions (longkukuhi/RAD at 59847f4).

1. Image level: the k training images whose (L2-normalised) CLS tokens are most cosine-similar to the test
   image's; k larger than the memory is clamped (the official ``torch.topk`` raises there, e.g. in few-shot runs).
2. Patch level, per block: each test patch's score is 1 − the largest cosine with the retrieved images' patches in
   a (2ρ+1)² window around the same grid cell, clipped at the border (a corner sees 2×2 cells for ρ=1), or with
   all their patches (``positional`` off). The official code loops over the 784 positions in Python; here each
   cell's k retrieved tokens are multiplied once with the queries whose windows cover it, which gives the same
   maximum.
3. The block scores are averaged (weights renormalised to sum 1), upsampled bilinearly to ``map_size``, blurred
   with a 5×5 Gaussian (σ=1, zero padding) and the image score is the mean of the top ``max_ratio`` of the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Cosine given to a candidate that does not count (a background cell in the 3D branch): below any real cosine.
EXCLUDED = -2.0


def normalised(tokens: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero), in float32 or wider."""
    tokens = tokens if tokens.dtype == torch.float64 else tokens.float()
    return tokens / tokens.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def retrieve_images(query_cls: torch.Tensor, bank_cls: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``min(k, N)`` bank images most cosine-similar to ``query_cls``, most similar first.

    Args:
        query_cls: (C,) CLS token of the test image.
        bank_cls: (N, C) CLS tokens of the memory (any scale: both sides are normalised here).
        k: How many to retrieve (RAD: 150 on MVTec AD, 900 on VisA/Real-IAD, 48 on 3D-ADAM).
    """
    if bank_cls.ndim != 2 or bank_cls.shape[0] == 0:
        raise ValueError(f"the memory holds no image (CLS bank of shape {tuple(bank_cls.shape)})")
    bank = normalised(bank_cls)
    similarity = bank @ normalised(query_cls.reshape(-1)).to(bank)
    return torch.topk(similarity, min(int(k), bank_cls.shape[0])).indices


def window_similarity(
    query: torch.Tensor,
    references: torch.Tensor,
    grid: tuple[int, int],
    radius: int,
    reference_valid: torch.Tensor | None = None,
    offsets_per_pass: int = 25,
) -> torch.Tensor:
    """(P,) largest cosine of each query patch over the references' patches in its clipped (2ρ+1)² window.

    Each reference cell is read once per pass: one batched product per cell multiplies the k retrieved images'
    tokens there with the queries that see that cell at each window offset (up to ``offsets_per_pass`` offsets a
    pass), the maximum over the images is taken, and each offset's maxima are folded into the queries it belongs
    to. Off-grid cells are never candidates (clipping, not padding).

    Args:
        query: (P, C) unit-norm tokens of the test image, row-major over ``grid`` (P = h·w).
        references: (k, P, C) unit-norm tokens of the retrieved images.
        grid: (h, w).
        radius: ρ ≥ 0.
        reference_valid: Optional (k, P) bool: which reference cells may be matched (the 3D branch's
            foreground); a cell that may not scores :data:`EXCLUDED`.
        offsets_per_pass: Window offsets per batched product (bounds the (P, C, offsets) query copy).
    """
    rows, cols = grid
    _, positions, channels = references.shape
    if positions != rows * cols or query.shape != (positions, channels):
        raise ValueError(f"query {tuple(query.shape)} and references {tuple(references.shape)} do not fit {grid}")
    per_cell = references.permute(1, 0, 2).contiguous()  # (P, k, C): the k images' tokens at each cell
    q = query.reshape(rows, cols, channels)
    best = torch.full((rows, cols), EXCLUDED, dtype=q.dtype, device=q.device)
    offsets = [(dr, dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)]

    def cells(dr: int, dc: int) -> tuple[slice, slice, slice, slice] | None:
        """(reference rows, cols, query rows, cols) where a query at (r, c) sees the cell (r + dr, c + dc)."""
        top, bottom, left, right = max(0, dr), min(rows, rows + dr), max(0, dc), min(cols, cols + dc)
        if top >= bottom or left >= right:
            return None
        return slice(top, bottom), slice(left, right), slice(top - dr, bottom - dr), slice(left - dc, right - dc)

    for start in range(0, len(offsets), max(1, offsets_per_pass)):
        group = offsets[start : start + max(1, offsets_per_pass)]
        seen_by = q.new_zeros(rows, cols, channels, len(group))  # per cell, the query of each offset
        for index, (dr, dc) in enumerate(group):
            span = cells(dr, dc)
            if span is not None:
                seen_by[span[0], span[1], :, index] = q[span[2], span[3]]
        cosine = torch.bmm(per_cell, seen_by.reshape(positions, channels, len(group)))  # (P, k, offsets)
        if reference_valid is not None:
            cosine = cosine.masked_fill(~reference_valid.T.unsqueeze(-1), EXCLUDED)
        top_cosine = cosine.amax(dim=1).reshape(rows, cols, len(group))
        for index, (dr, dc) in enumerate(group):
            span = cells(dr, dc)
            if span is not None:
                region = best[span[2], span[3]]
                best[span[2], span[3]] = torch.maximum(region, top_cosine[span[0], span[1], index])
    return best.reshape(-1)


def global_similarity(
    query: torch.Tensor, references: torch.Tensor, reference_valid: torch.Tensor | None = None, chunk: int = 4096
) -> torch.Tensor:
    """(P,) largest cosine of each query patch over every patch of every reference (RAD without positions)."""
    flat = references.reshape(-1, references.shape[-1])
    keep = None if reference_valid is None else reference_valid.reshape(-1)
    if flat.shape[0] == 0:
        return torch.full((query.shape[0],), EXCLUDED, dtype=query.dtype, device=query.device)
    best = []
    for start in range(0, query.shape[0], max(1, chunk)):
        cosine = query[start : start + chunk] @ flat.T
        if keep is not None:
            cosine = cosine.masked_fill(~keep, EXCLUDED)
        best.append(cosine.amax(dim=1))
    return torch.cat(best) if best else torch.zeros(0, dtype=query.dtype)


def layer_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """The blocks' weights renormalised to sum 1 (None: equal, RAD's default)."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"{len(weights)} layer weights for {count} layers")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"layer weights must be non-negative with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def gaussian_kernel2d(size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Normalised size×size Gaussian (RAD's ``get_gaussian_kernel(5, 1.0)``)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = taps[:, None] * taps[None, :]
    return kernel / kernel.sum()


def finalize(
    patch_scores: torch.Tensor,
    grid: tuple[int, int],
    *,
    map_size: int,
    out_size: int,
    sigma: float = 1.0,
    kernel_size: int = 5,
    max_ratio: float = 0.01,
) -> tuple[torch.Tensor, float]:
    """(out_size×out_size map, image score) from (P,) fused patch scores.

    The map is computed at ``map_size`` (RAD: 256) as the official code: bilinear upsampling (align_corners
    False), then the zero-padded Gaussian; the score is the mean of its top ``int(max_ratio · map_size²)`` pixels
    (the maximum when that is 0). The returned map is resized bilinearly to ``out_size`` when they differ.
    """
    grid_map = patch_scores.reshape(1, 1, *grid).float()
    upsampled = F.interpolate(grid_map, size=(map_size, map_size), mode="bilinear", align_corners=False)
    if sigma > 0 and kernel_size > 0:
        kernel = gaussian_kernel2d(kernel_size, sigma).to(upsampled).view(1, 1, kernel_size, kernel_size)
        upsampled = F.conv2d(upsampled, kernel, padding=kernel_size // 2)
    flat = upsampled.reshape(-1)
    top = top_count(max_ratio, map_size)
    score = float(flat.max()) if top <= 0 else float(torch.topk(flat, min(top, flat.numel())).values.mean())
    if map_size != out_size:
        upsampled = F.interpolate(upsampled, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return upsampled[0, 0], score


def top_count(max_ratio: float, map_size: int) -> int:
    """Pixels the image score averages: ``int(max_ratio · map_size²)`` as the official code (655 for 1 % of 256²)."""
    return int(max_ratio * map_size * map_size)
