"""M3DM's Unsupervised Feature Fusion (UFF): per-modality LayerNorm + MLP trained with patch-wise InfoNCE.

The two MLPs are trained so that the RGB and point features of the *same* patch agree (through two 256-d heads)
and differ from other patches'. At inference only the MLP outputs are used, concatenated, as the fused feature;
the heads exist only for the loss. Module names follow the official ``FeatureFusionBlock`` (``xyz_norm``,
``xyz_mlp.fc1``, ``rgb_head`` …) so its released checkpoint layout is recognisable.

Training and fusing run where the block's parameters are (``--device``), the networks under
:func:`~mmiad.utils.compute.autocast` (``--precision``); the logits and the cross-entropy are taken in float32,
so fp32 is the unchanged computation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmiad.utils.budget import (
    RUNTIME_OVERHEAD_BYTES,
    MicroBatchPlan,
    count_saved_bytes,
    plan_micro_batches,
    resolve_budget,
)
from mmiad.utils.compute import autocast

HEAD_DIM = 256
# Measured peak / counted saved bytes (see mmiad.methods.unircm.memory; the same allocator slack).
CALIBRATION = 1.15


class Mlp(nn.Module):
    """Linear → GELU → Linear with the hidden width ``ratio`` × input (timm's Mlp naming)."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FeatureFusionBlock(nn.Module):
    """UFF for point features of width ``xyz_dim`` and RGB features of width ``rgb_dim``."""

    def __init__(self, xyz_dim: int, rgb_dim: int, mlp_ratio: float = 4.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.xyz_norm = nn.LayerNorm(xyz_dim)
        self.xyz_mlp = Mlp(xyz_dim, mlp_ratio)
        self.rgb_norm = nn.LayerNorm(rgb_dim)
        self.rgb_mlp = Mlp(rgb_dim, mlp_ratio)
        self.xyz_head = nn.Linear(xyz_dim, HEAD_DIM)
        self.rgb_head = nn.Linear(rgb_dim, HEAD_DIM)
        self.temperature = temperature

    def fuse(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """N×(xyz_dim + rgb_dim): the concatenated MLP outputs, the fused feature of the memory bank."""
        return torch.cat([self.xyz_mlp(self.xyz_norm(xyz)), self.rgb_mlp(self.rgb_norm(rgb))], dim=-1)

    def fuse_on_device(self, xyz: torch.Tensor, rgb: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """:meth:`fuse` of CPU rows on the block's device under ``precision``, handed back as CPU float32 (what the
        banks store and search)."""
        device = next(self.parameters()).device
        with torch.no_grad(), autocast(device, precision):
            fused = self.fuse(xyz.to(device), rgb.to(device))
        return fused.float().cpu()

    def query(self, rgb: torch.Tensor) -> torch.Tensor:
        """L2-normalised RGB head outputs (the InfoNCE queries)."""
        return F.normalize(self.rgb_head(self.rgb_mlp(self.rgb_norm(rgb))), dim=1)

    def key(self, xyz: torch.Tensor) -> torch.Tensor:
        """L2-normalised point head outputs (the InfoNCE keys)."""
        return F.normalize(self.xyz_head(self.xyz_mlp(self.xyz_norm(xyz))), dim=1)

    def contrastive_loss(self, xyz: torch.Tensor, rgb: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Patch-wise InfoNCE over N aligned foreground patches (row i of both is the same patch).

        As the official code: query = RGB head, key = point head, both L2-normalised, logits ``q kᵀ / T``,
        cross-entropy against the diagonal, one direction only, scaled by ``2T``. The heads run under
        ``precision``'s autocast; the logits and the loss in the inputs' dtype.
        """
        with autocast(xyz.device, precision):
            query, key = self.query(rgb), self.key(xyz)
        logits = query.to(xyz.dtype) @ key.to(xyz.dtype).T / self.temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, labels) * (2 * self.temperature)


def contrastive_backward(
    block: FeatureFusionBlock,
    xyz: torch.Tensor,
    rgb: torch.Tensor,
    *,
    memory_budget_gb: float | None,
    scale: float = 1.0,
    precision: str = "fp32",
) -> float:
    """Gradients of ``scale`` × :meth:`FeatureFusionBlock.contrastive_loss` added to ``block``'s; returns the
    (unscaled) loss. ``scale`` is ``1 / accum_iter`` when batches are accumulated into one optimizer step.

    The loss is not a sum over images: every patch of a batch is a negative of every other, so its N×N logits
    grow with the square of the batch (16 images × ~3,000 foreground patches: ~9 GB with their gradients). When
    they do not fit the budget, the loss is computed in chunks of query rows without changing it: the queries and
    keys are computed once without a graph; each chunk's rows of the cross-entropy (against *all* keys) add
    their gradients to the queries and keys; then each chunk of rows goes through the networks again and
    back-propagates its share. The gradients are the whole batch's up to float rounding. The rows are moved to
    the block's device; the networks run under ``precision``'s autocast.

    Raises:
        mmiad.utils.budget.MemoryBudgetError: Not even one query row fits the budget.
        FloatingPointError: The loss is not finite.
    """
    device = next(block.parameters()).device
    xyz, rgb = xyz.to(device), rgb.to(device)
    rows = xyz.shape[0]
    chunk = plan_contrastive_chunks(block, rows, memory_budget_gb).micro_batch
    if chunk >= rows:
        loss = block.contrastive_loss(xyz, rgb, precision)
        _check_finite(loss)
        (loss * scale).backward()
        return float(loss.detach())
    starts = range(0, rows, chunk)
    with torch.no_grad(), autocast(device, precision):
        query = torch.cat([block.query(rgb[s : s + chunk]) for s in starts]).to(xyz.dtype).requires_grad_()
        key = torch.cat([block.key(xyz[s : s + chunk]) for s in starts]).to(xyz.dtype).requires_grad_()
    total = 0.0
    with torch.enable_grad():
        for s in starts:
            logits = query[s : s + chunk] @ key.T / block.temperature
            labels = torch.arange(s, s + logits.shape[0], device=device)
            loss = F.cross_entropy(logits, labels, reduction="sum") * (2 * block.temperature / rows)
            _check_finite(loss)
            (loss * scale).backward()
            total += float(loss.detach())
        assert query.grad is not None and key.grad is not None  # filled by the chunks' backward passes above
        for s in starts:
            with autocast(device, precision):
                chunk_query, chunk_key = block.query(rgb[s : s + chunk]), block.key(xyz[s : s + chunk])
            chunk_query.to(xyz.dtype).backward(query.grad[s : s + chunk])
            chunk_key.to(xyz.dtype).backward(key.grad[s : s + chunk])
    return total


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError("UFF training diverged (non-finite loss); try a lower learning rate")


def plan_contrastive_chunks(block: FeatureFusionBlock, rows: int, memory_budget_gb: float | None) -> MicroBatchPlan:
    """Query rows per chunk of the InfoNCE loss within the budget (the "images" of the plan are patch rows).

    Per query row: its row of logits, softmax and their gradient (3 × N floats) and its networks' activations
    (counted by a probe); fixed: queries, keys and their gradients (4 × N × 256 floats), parameters with AdamW's
    state (4 × their size).
    """
    xyz_dim, rgb_dim = block.xyz_norm.normalized_shape[0], block.rgb_norm.normalized_shape[0]
    probe = 64
    generator = torch.Generator().manual_seed(0)
    dtype, device = next(block.parameters()).dtype, next(block.parameters()).device
    with count_saved_bytes([block]) as saved:
        block.query(torch.randn(probe, rgb_dim, generator=generator).to(device=device, dtype=dtype))
        block.key(torch.randn(probe, xyz_dim, generator=generator).to(device=device, dtype=dtype))
    parameters = sum(p.numel() * p.element_size() for p in block.parameters())
    return plan_micro_batches(
        rows,
        fixed_bytes=4 * parameters + 4 * rows * HEAD_DIM * dtype.itemsize + RUNTIME_OVERHEAD_BYTES,
        per_image_bytes=CALIBRATION * (saved.total / probe + 3 * rows * dtype.itemsize),
        budget_bytes=resolve_budget(memory_budget_gb, device),
        what="M3DM UFF training",
        hint=", or cap the patches per step (--set uff_max_patches=...)",
    )


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up then half-cycle cosine to zero, per iteration (the official ``adjust_learning_rate``)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def official_training_rgb(rgb_coarse: torch.Tensor, fine_rows: int) -> torch.Tensor:
    """The RGB rows the official UFF training saw: the coarse rows tiled, *not* a spatial upsample.

    The official feature dump builds its 3136 RGB rows from the 784 coarse ones by tiling them ``k`` = 4 times and
    reading the tiles column-wise, so fine position ``p`` gets coarse row ``(k·(p mod n) + p div n) mod n``; at
    test time UFF gets the spatially correct pooled rows. Only ``compat`` reproduces this mismatch.

    Args:
        rgb_coarse: n×C rows of the coarse RGB grid (row-major).
        fine_rows: Rows of the fine (point) grid, a multiple of n.
    """
    coarse_rows = rgb_coarse.shape[0]
    if fine_rows % coarse_rows:
        raise ValueError(f"{fine_rows} fine rows are not a multiple of {coarse_rows} coarse rows")
    factor = fine_rows // coarse_rows
    position = torch.arange(fine_rows)
    return rgb_coarse[(factor * (position % coarse_rows) + position // coarse_rows) % coarse_rows]
