"""The official 3D→grid projection computed as one sparse product instead of through a dense pixel map.

The official code interpolates every group feature onto all S×S pixels (a 224×224×1152 map: 231 MB), pools it
3×3 without padding and adaptive-averages it to the method's grid. Every step is linear, and the pooling is
separable, so the result is ``A · features`` where ``A`` (G²×M) holds, for each grid cell and feature row, the
summed weight with which that row reaches the cell: the interpolation weight of each pixel times the pooling
weights of that pixel's row and column. ``A`` has a few non-zeros per cell, so the product costs a fraction of
the dense map (measured in ``BENCHMARKS.md``) and gives the same numbers up to float rounding. It runs on the
device of its inputs (sparse CSR products exist on the CPU and on CUDA).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def axis_pooling(size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input index along one axis: the output indices it reaches and with which weight.

    The axis operator is the 3-tap mean (no padding: ``size`` → ``size − 2``) followed by adaptive averaging to
    ``out_size`` (bins ``[⌊a·L/out⌋, ⌈(a+1)·L/out⌉)``, PyTorch's definition). Returns ``(index, weight)``, both
    ``size × m`` with ``m`` the most outputs one input reaches; unused slots have weight 0.
    """
    if size < 3 or out_size < 1:
        raise ValueError(f"the projection needs an input side of at least 3 and an output side >= 1, got {size}")
    length = size - 2
    operator = torch.zeros(out_size, size, dtype=torch.float64)
    for cell in range(out_size):
        start, end = (cell * length) // out_size, -(-(cell + 1) * length // out_size)
        for pooled in range(start, end):  # each pooled position averages inputs pooled..pooled+2
            operator[cell, pooled : pooled + 3] += 1.0 / (3 * (end - start))
    reach = int((operator != 0).sum(dim=0).max())
    weight, index = torch.topk(operator.T, reach, dim=1)
    return index, weight.float()


# Largest cells × feature rows scratch summed densely (float32 entries: 64 MB); larger grids sort instead.
SCRATCH_ENTRIES = 16 * 2**20


def projection_matrix(
    pixel_index: torch.Tensor, neighbors: torch.Tensor, weights: torch.Tensor, size: int, out_size: int, rows: int
) -> torch.Tensor:
    """``A`` (out²×rows, sparse CSR): grid cell ← feature row weights of the official projection.

    The (cell, row) pairs repeat many times (neighbouring pixels blend the same rows). On coarse grids they are
    summed in a dense cells × rows scratch and only its non-zeros kept (linear time); on fine grids, where that
    scratch would be large, by sorting.

    Args:
        pixel_index: N flat indices of the valid pixels on the S×S input grid.
        neighbors: N×k feature rows each pixel blends.
        weights: N×k blending weights.
        size: Input side S.
        out_size: Output side G.
        rows: Number of feature rows M.
    """
    device = pixel_index.device
    index, weight = (t.to(device) for t in axis_pooling(size, out_size))  # cached on the CPU, used where the data is
    reach = index.shape[1]
    row_index, row_weight = index[pixel_index // size], weight[pixel_index // size]  # N×m
    col_index, col_weight = index[pixel_index % size], weight[pixel_index % size]
    cells = (row_index[:, :, None] * out_size + col_index[:, None, :]).reshape(-1, reach * reach)
    cell_weights = (row_weight[:, :, None] * col_weight[:, None, :]).reshape(-1, reach * reach)
    k = neighbors.shape[1]
    targets = cells[:, :, None].expand(-1, -1, k).reshape(-1)
    sources = neighbors[:, None, :].expand(-1, reach * reach, -1).reshape(-1)
    values = (cell_weights[:, :, None] * weights.float()[:, None, :]).reshape(-1)
    total_cells = out_size * out_size
    with warnings.catch_warnings():  # CSR is all this needs from torch's "beta" sparse support
        warnings.simplefilter("ignore", UserWarning)
        if total_cells * rows <= SCRATCH_ENTRIES:
            scratch = torch.zeros(total_cells * rows, device=device)
            scratch.index_add_(0, targets * rows + sources, values)
            return scratch.view(total_cells, rows).to_sparse_csr()
        # Fine grids (CFM's 224²) would need too large a scratch: sort-and-sum the pairs instead.
        used = values != 0
        matrix = torch.sparse_coo_tensor(
            torch.stack([targets[used], sources[used]]), values[used], (total_cells, rows), check_invariants=False
        )
        return matrix.coalesce().to_sparse_csr()


def project_to_grid(
    features: torch.Tensor,
    pixel_index: torch.Tensor,
    neighbors: torch.Tensor,
    weights: torch.Tensor,
    size: int,
    out_size: int,
) -> torch.Tensor:
    """C×G×G: the official dense-map projection of ``features`` (M×C), computed sparsely."""
    channels = features.shape[1]
    if pixel_index.numel() == 0:
        return torch.zeros(channels, out_size, out_size, dtype=features.dtype, device=features.device)
    matrix = projection_matrix(pixel_index, neighbors, weights, size, out_size, features.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        grid = torch.sparse.mm(matrix, features.float())
    return grid.T.reshape(channels, out_size, out_size).to(features.dtype)
