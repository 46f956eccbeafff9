"""Frozen Point-MAE encoder as a 3D feature extractor (M3DM/CFM/Uni-RCM ``PointTransformer``), in-house.

A cloud's valid points are split into FPS-centred kNN groups (1024 × 128 at inference, unlike the 64 × 32 of
pre-training), each group is embedded by a Mini-PointNet, and 12 transformer blocks (input ``x + pos`` at every
block) mix the groups. The feature of a group is the concatenation of blocks 3, 7 and 11 (0-based), each through
the shared final LayerNorm: 3 × 384 = 1152 channels. Features go back to every valid pixel by 3-NN inverse
squared-distance weights, kept sparse in :class:`~mmiad.features.base.PointFeatures`.

Parameter names match the official ``pretrain.pth`` after its ``module.``/``MAE_encoder.`` prefixes are stripped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmiad.features.base import PointFeatures
from mmiad.features.checkpoints import CheckpointError, load_strict, read_checkpoint, strip_prefixes
from mmiad.features.grouping import GroupingFn, knn_group_indices, three_nn_weights
from mmiad.features.layers import Attention, Mlp

_GROUP_CHUNK = 128  # groups per Mini-PointNet pass: bounds activations to ~32 MB for 128-point groups


@dataclass(frozen=True)
class PointMaePreset:
    """Grouping, pruning and output layers of one Point-MAE variant.

    Attributes:
        name: Preset name (registry key).
        num_group: FPS centres per cloud.
        group_size: Points per kNN group.
        keep_blocks: Transformer blocks run (CFM's ``layers_keep``).
        layers: 0-based blocks whose normed outputs are concatenated; all must be < ``keep_blocks``.
        weights: Names in :data:`mmiad.features.weights.KNOWN_WEIGHTS`, tried in order.
    """

    name: str
    num_group: int
    group_size: int
    keep_blocks: int
    layers: tuple[int, ...]
    weights: tuple[str, ...] = ("pointmae",)


_FULL = PointMaePreset("pointmae", 1024, 128, 12, (3, 7, 11))

#: Named presets. The pruned layer choices are the official ones for keep 12/8/4. For keep 1 the official code
#: falls to its "otherwise" branch (last layer only, 384-d); we keep that honestly rather than repeating the
#: layer to fake 1152 channels, so ``pointmae_keep1`` has 384 output channels.
POINTMAE_PRESETS: dict[str, PointMaePreset] = {
    "pointmae": _FULL,
    "pointmae_keep8": replace(_FULL, name="pointmae_keep8", keep_blocks=8, layers=(1, 4, 7)),
    "pointmae_keep4": replace(_FULL, name="pointmae_keep4", keep_blocks=4, layers=(1, 2, 3)),
    "pointmae_keep1": replace(_FULL, name="pointmae_keep1", keep_blocks=1, layers=(0,)),
}

TRANS_DIM = 384
NUM_HEADS = 6
DEPTH = 12


def official_layers(keep_blocks: int) -> tuple[int, ...]:
    """The layers CFM concatenates for a given ``layers_keep`` (its 'otherwise' branch: the last layer only)."""
    return {12: (3, 7, 11), 8: (1, 4, 7), 4: (1, 2, 3)}.get(keep_blocks, (keep_blocks - 1,))


class MiniPointNet(nn.Module):
    """Point-MAE's group ``Encoder``: shared point MLP, max-pool, concat global+local, MLP, max-pool."""

    def __init__(self, out_dim: int = TRANS_DIM) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, out_dim, 1)
        )

    @staticmethod
    def _dense(x: torch.Tensor, conv: nn.Module, bias: bool = True) -> torch.Tensor:
        return F.linear(x, conv.weight[..., 0], conv.bias if bias else None)

    @staticmethod
    def _norm(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
        shape = x.shape
        out = F.batch_norm(
            x.reshape(-1, shape[-1]), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
        return out.view(shape)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """(G,K,3) centred groups → (G,C) tokens (inference only: BatchNorm uses running statistics).

        The first layer of ``second_conv`` acts on ``[global; local]``; its global half is the same for every
        point of a group, so it is applied once per group instead of once per point, which saves about a
        third of the encoder's arithmetic without changing the result beyond float rounding.
        """
        conv0, bn0, _, conv1 = self.first_conv
        conv2, bn1, _, conv3 = self.second_conv
        outputs = []
        for start in range(0, groups.shape[0], _GROUP_CHUNK):
            x = groups[start : start + _GROUP_CHUNK]
            local = self._dense(torch.relu(self._norm(self._dense(x, conv0), bn0)), conv1)  # (g,K,256)
            pooled = local.amax(dim=1)  # (g,256)
            weight = conv2.weight[..., 0]
            width = pooled.shape[-1]
            hidden = F.linear(local, weight[:, width:]) + F.linear(pooled, weight[:, :width], conv2.bias)[:, None]
            hidden = torch.relu(self._norm(hidden, bn1))
            outputs.append(self._dense(hidden, conv3).amax(dim=1))
        return torch.cat(outputs) if outputs else groups.new_zeros(0, conv3.out_channels)


class Block(nn.Module):
    """Pre-LN block with PyTorch's default LayerNorm eps (1e-5), as Point-MAE."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlockStack(nn.Module):
    """Holder so the keys read ``blocks.blocks.{i}`` like the checkpoint's ``TransformerEncoder``."""

    def __init__(self, count: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(count))


class PointMaeEncoder(nn.Module):
    """Mini-PointNet + positional MLP + the kept transformer blocks + final LayerNorm.

    ``dim``/``num_heads`` exist only so tests can use a narrow model; the released checkpoint is 384/6.
    """

    def __init__(
        self,
        keep_blocks: int = DEPTH,
        layers: tuple[int, ...] = (3, 7, 11),
        *,
        dim: int = TRANS_DIM,
        num_heads: int = NUM_HEADS,
    ) -> None:
        super().__init__()
        if not 1 <= keep_blocks <= DEPTH:
            raise ValueError(f"keep_blocks must be in [1, {DEPTH}], got {keep_blocks}")
        if not layers or any(not 0 <= layer < keep_blocks for layer in layers):
            raise ValueError(f"output layers {layers} must be within the {keep_blocks} kept blocks")
        self.layers = tuple(layers)
        self.dim = dim
        self.encoder = MiniPointNet(dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = BlockStack(keep_blocks, dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, neighborhoods: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """(G,K,3) centred groups and (G,3) centres → (G, dim·len(layers)) features."""
        x = self.encoder(neighborhoods)[None]
        pos = self.pos_embed(centres)[None]
        picked = []
        for index, block in enumerate(self.blocks.blocks):
            x = block(x + pos)
            if index in self.layers:
                picked.append(self.norm(x))
        return torch.cat(picked, dim=-1)[0]


_UNUSED_PREFIXES = ("MAE_decoder.", "decoder_pos_embed.", "increase_dim.", "mask_token")


def load_pointmae_weights(model: PointMaeEncoder, path: str | Path) -> None:
    """Load the official Point-MAE pre-training checkpoint (or a plain converted state dict) strictly.

    The official file is ``{'base_model': {'module.MAE_encoder.…': …}, 'optimizer': …, 'epoch': …}``. After
    stripping ``module.`` and then ``MAE_encoder.``/``base_model.``, the decoder, ``increase_dim`` and
    ``mask_token`` are known and ignored, as are blocks removed by pruning; any other difference raises
    :class:`~mmiad.features.checkpoints.CheckpointError` listing the keys.
    """
    raw = read_checkpoint(path)
    state = raw["base_model"] if isinstance(raw.get("base_model"), dict) else raw
    if not isinstance(state, dict):
        raise CheckpointError(path, "'base_model' is not a state dict")
    state = strip_prefixes(strip_prefixes(state, ("module.",)), ("MAE_encoder.", "base_model."))
    keep = len(model.blocks.blocks)

    def unused(key: str) -> bool:
        if key.startswith(_UNUSED_PREFIXES):
            return True
        parts = key.split(".")
        return key.startswith("blocks.blocks.") and parts[2].isdigit() and int(parts[2]) >= keep

    load_strict(
        model,
        state,
        path=path,
        ignore_unexpected=unused,
        ignore_missing=lambda key: key.endswith("num_batches_tracked"),
    )


@dataclass
class PointGroups:
    """Point-MAE features with the grouping they came from (see :meth:`PointMaeExtractor.extract_groups`).

    Attributes:
        features: The same :class:`PointFeatures` as :meth:`PointMaeExtractor.extract` (G rows, 3-NN projection).
        points: (N,3) valid points, in the order of ``features.pixel_index``.
        centre_idx: (G,) rows of ``points`` that are group centres.
        member_idx: (G,K) rows of ``points`` in each group.
        layer_width: Channels per output layer (384): ``features.features`` is their concatenation.
    """

    features: PointFeatures
    points: torch.Tensor
    centre_idx: torch.Tensor
    member_idx: torch.Tensor
    layer_width: int


class PointMaeExtractor:
    """:class:`~mmiad.features.base.PointFeatureExtractor` around a frozen :class:`PointMaeEncoder`.

    Attributes:
        out_channels: 384 × number of output layers (1152 for the papers' preset).
        preset: Grouping and pruning settings (may carry test-size overrides).
        weights_id: SHA-256 of the weights file, or ``random-<seed>``.
    """

    def __init__(
        self, model: PointMaeEncoder, preset: PointMaePreset, weights_id: str, fps_backend: str = "auto"
    ) -> None:
        if tuple(preset.layers) != model.layers or preset.keep_blocks != len(model.blocks.blocks):
            raise ValueError(f"preset {preset.name} does not match the model's layers/blocks")
        self.model = model.eval().requires_grad_(False)
        self.preset = preset
        self.weights_id = weights_id
        self.fps_backend = fps_backend
        self.out_channels = model.dim * len(preset.layers)

    def config(self) -> dict[str, Any]:
        """Everything that changes the features (the FPS backend does not: both give identical indices)."""
        settings = {k: v for k, v in asdict(self.preset).items() if k != "weights"}  # candidates only
        return {"kind": "pointmae", **settings, "weights": self.weights_id}

    def extract(self, xyz: np.ndarray, valid: np.ndarray) -> PointFeatures:
        """Features for one S×S organized cloud; pixels outside ``valid`` are ignored.

        A cloud with no valid point gives zero group features and zero pixels (its dense map is all zeros).
        """
        return self.extract_groups(xyz, valid).features

    def extract_groups(self, xyz: np.ndarray, valid: np.ndarray, grouping: GroupingFn | None = None) -> PointGroups:
        """:meth:`extract` plus the grouping, optionally replaced (MuSc-V2's iterative point grouping).

        The hook exists for zero-shot methods that score group tokens directly and need the group centres; with
        ``grouping=None`` the features are exactly those of :meth:`extract` (FPS + kNN). Not cached: the feature
        cache keys on :meth:`config`, which does not know the grouping.
        """
        xyz = np.asarray(xyz)
        valid = np.asarray(valid)
        if xyz.ndim != 3 or xyz.shape[-1] != 3 or xyz.shape[0] != xyz.shape[1]:
            raise ValueError(f"expected a square organized cloud of shape (S,S,3), got {xyz.shape}")
        if valid.shape != xyz.shape[:2] or valid.dtype != np.bool_:
            raise ValueError(f"expected a bool valid mask of shape {xyz.shape[:2]}, got {valid.dtype} {valid.shape}")
        size = int(xyz.shape[0])
        pixel_index = np.flatnonzero(valid.reshape(-1))
        points = torch.from_numpy(np.ascontiguousarray(xyz.reshape(-1, 3)[pixel_index], dtype=np.float32))
        if not torch.isfinite(points).all():
            raise ValueError("valid points must have finite coordinates")
        centre_idx = torch.zeros(0, dtype=torch.long)
        member_idx = torch.zeros(0, self.preset.group_size, dtype=torch.long)
        with torch.inference_mode():
            if points.shape[0] == 0:
                features = torch.zeros(0, self.out_channels)
                neighbors, weights = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
            else:
                if grouping is None:
                    centre_idx, member_idx = knn_group_indices(
                        points, self.preset.num_group, self.preset.group_size, fps_backend=self.fps_backend
                    )
                else:
                    centre_idx, member_idx = grouping(points, self.preset.num_group, self.preset.group_size)
                centres = points[centre_idx]
                features = self.model(points[member_idx] - centres[:, None, :], centres)
                neighbors, weights = three_nn_weights(points, centres)
        # Clone out of inference mode: inference tensors cannot be used by later autograd (CFM training).
        point_features = PointFeatures(
            features=features.clone(),
            pixel_index=torch.from_numpy(pixel_index.astype(np.int64)),
            neighbors=neighbors.clone(),
            weights=weights.clone(),
            grid_size=size,
        )
        return PointGroups(point_features, points, centre_idx.clone(), member_idx.clone(), self.model.dim)
