"""Frozen Point-MAE encoder as a 3D feature extractor (M3DM/CFM/Uni-RCM ``PointTransformer``), in-house.

A cloud's valid points are split into FPS-centred kNN groups (1024 × 128 at inference, unlike the 64 × 32 of
pre-training), each group is embedded by a Mini-PointNet, and 12 transformer blocks (input ``x + pos`` at every
block) mix the groups. The feature of a group is the concatenation of blocks 3, 7 and 11 (0-based), each through
the shared final LayerNorm: 3 × 384 = 1152 channels. Features go back to every valid pixel by 3-NN inverse
squared-distance weights, kept sparse in :class:`~mmiad.features.base.PointFeatures`.

Parameter names match the official ``pretrain.pth`` after its ``module.``/``MAE_encoder.`` prefixes are stripped.

The official CFM, M3DM and Uni-RCM scripts never put this network in eval mode, so their features (and the
published numbers) come from the training-mode forward under ``no_grad``: the Mini-PointNet's BatchNorm layers
normalise with the statistics of the cloud being processed, and DropPath is active. mmiad reproduces that by
default (``batchnorm="cloud"``) with DropPath at its expected value, the identity, so features stay
deterministic; ``batchnorm="running"`` (the pre-training statistics, i.e. eval mode) and ``drop_path="sampled"``
(the official random DropPath, seeded) are the named alternatives.

Moved to a GPU (:meth:`PointMaeExtractor.to`), the whole extraction runs there: FPS and kNN by their torch
versions (the same indices as the CPU's NumPy FPS and k-d tree), the encoder, and the 3-NN weights. Under a
low-precision autocast only the encoder's products take the low precision; grouping, weights and the layer
before the first BatchNorm stay float32 (see :meth:`MiniPointNet._hidden`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmiad.features.base import NONZERO_RULES, PointFeatures, feature_points
from mmiad.features.checkpoints import CheckpointError, load_strict, read_checkpoint, strip_prefixes
from mmiad.features.grouping import GroupingFn, knn_group_indices, regroup_mean, three_nn_weights
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
    # G2SF's grouping: 512 FPS centres of 128 points (its config_parse.py), the full 12-block encoder.
    "pointmae_g512": replace(_FULL, name="pointmae_g512", num_group=512),
    # GLFM (hustCYQ/GLFM-Multi-class-3DAD, fetch_idx=[0, 1]): the first two blocks, 768-d; blocks 2-11 never run.
    "pointmae_glfm": replace(_FULL, name="pointmae_glfm", keep_blocks=2, layers=(0, 1)),
}

TRANS_DIM = 384
NUM_HEADS = 6
DEPTH = 12
DROP_PATH_RATE = 0.1  # PointTransformer.drop_path_rate in the official full_models.py

#: ``cloud``: BatchNorm with the statistics of the current cloud (the official scripts' training-mode forward);
#: ``running``: with the running statistics stored in the checkpoint (eval mode).
BATCHNORM_MODES = ("cloud", "running")
#: ``expected``: DropPath at its expected value, the identity; ``sampled``: random DropPath as the official scripts
#: run it, drawn from a generator seeded per cloud.
DROP_PATH_MODES = ("expected", "sampled")
#: ``first``: FPS starts at the cloud's first point (the CUDA kernel CFM and M3DM use); ``random``: at a random point,
#: as the pure-PyTorch FPS of CMDR-IAD's code, drawn from a generator seeded per cloud.
FPS_STARTS = ("first", "random")


def drop_path_rates(blocks: int) -> list[float]:
    """Per-block DropPath rates: the first ``blocks`` of ``linspace(0, 0.1, 12)``, as built before pruning."""
    return torch.linspace(0, DROP_PATH_RATE, DEPTH).tolist()[:blocks]


def sample_drop_path(rates: list[float], generator: torch.Generator) -> list[tuple[float, float]]:
    """One draw of timm's DropPath for every block: the factors of its attention and MLP branches.

    With one cloud per batch, each residual branch is dropped whole (factor 0) with probability ``rate`` and
    otherwise scaled by ``1 / (1 - rate)``, so its expected factor is 1. Blocks with rate 0 have no DropPath
    in the official model and draw nothing.
    """
    factors = []
    for rate in rates:
        if rate <= 0:
            factors.append((1.0, 1.0))
            continue
        keep = 1.0 - rate
        attn_draw, mlp_draw = torch.rand(2, generator=generator).tolist()
        factors.append((1.0 / keep if attn_draw < keep else 0.0, 1.0 / keep if mlp_draw < keep else 0.0))
    return factors


def official_layers(keep_blocks: int) -> tuple[int, ...]:
    """The layers CFM concatenates for a given ``layers_keep`` (its 'otherwise' branch: the last layer only)."""
    return {12: (3, 7, 11), 8: (1, 4, 7), 4: (1, 2, 3)}.get(keep_blocks, (keep_blocks - 1,))


def _combine_statistics(parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of a union from per-part ``(variance, mean, count)``, combined in float64.

    Each part's variance is taken about its own mean, and the parts are merged with the exact identity
    ``M2 = Σ nᵢ (varᵢ + (meanᵢ − mean)²)``, so no sum of squares of raw activations is ever formed (no cancellation
    when a channel's mean is large against its spread).
    """
    device = parts[0][1].device
    counts = torch.tensor([count for _, _, count in parts], dtype=torch.float64, device=device)[:, None]
    means = torch.stack([mean.double() for _, mean, _ in parts])
    variances = torch.stack([var.double() for var, _, _ in parts])
    total = counts.sum()
    mean = (counts * means).sum(dim=0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(dim=0) / total
    return mean, var


class MiniPointNet(nn.Module):
    """Point-MAE's group ``Encoder``: shared point MLP, max-pool, concat global+local, MLP, max-pool.

    Args:
        out_dim: Token width.
        batchnorm: One of :data:`BATCHNORM_MODES`. ``cloud`` reproduces ``nn.BatchNorm1d`` in training mode
            applied to all groups of the cloud at once: per channel, the mean and biased variance over all G·K
            values (eps 1e-5 as in the checkpoint's layers).
    """

    def __init__(self, out_dim: int = TRANS_DIM, batchnorm: str = "cloud") -> None:
        super().__init__()
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
        self.batchnorm = batchnorm
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, out_dim, 1)
        )

    def _layers(self) -> tuple[nn.Conv1d, nn.BatchNorm1d, nn.Conv1d, nn.Conv1d, nn.BatchNorm1d, nn.Conv1d]:
        """The six learned layers with their types (indexing an ``nn.Sequential`` gives an untyped module)."""
        first, second = self.first_conv, self.second_conv
        return (
            cast(nn.Conv1d, first[0]),
            cast(nn.BatchNorm1d, first[1]),
            cast(nn.Conv1d, first[3]),
            cast(nn.Conv1d, second[0]),
            cast(nn.BatchNorm1d, second[1]),
            cast(nn.Conv1d, second[3]),
        )

    @staticmethod
    def _running(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
        """A BatchNorm's running (mean, variance): the pre-training statistics of ``batchnorm="running"``."""
        assert bn.running_mean is not None and bn.running_var is not None, "Point-MAE tracks running statistics"
        return bn.running_mean, bn.running_var

    @staticmethod
    def _dense(x: torch.Tensor, conv: nn.Conv1d, bias: bool = True) -> torch.Tensor:
        return F.linear(x, conv.weight[..., 0], conv.bias if bias else None)

    @staticmethod
    def _norm(x: torch.Tensor, bn: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = F.batch_norm(x.reshape(-1, shape[-1]), mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return out.view(shape)

    def _input_statistics(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cloud statistics of the first BatchNorm's input, in closed form from the points' moments.

        That input is the affine map ``Wx + b`` of the centred points x, so its per-channel mean is ``Wμ + b`` and
        its biased variance ``wᵀΣw`` (μ, Σ: mean and biased covariance of all G·K points, in float64). This is
        exact, needs no pass over the 128-channel activations, and gives exactly 0 for a degenerate cloud.
        """
        conv = self._layers()[0]
        assert conv.bias is not None
        points = groups.reshape(-1, 3).double()
        mu = points.mean(dim=0)
        centred = points - mu
        covariance = centred.T @ centred / points.shape[0]
        weight = conv.weight[..., 0].double()
        mean = weight @ mu + conv.bias.double()
        var = torch.relu(((weight @ covariance) * weight).sum(dim=1))  # relu: rounding must not make it negative
        return mean.to(groups.dtype), var.to(groups.dtype)

    def _hidden(self, x: torch.Tensor, stats0: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(g,K,3) groups → (g,K,512) input of the second BatchNorm.

        The first layer of ``second_conv`` acts on ``[global; local]``; its global half is the same for every
        point of a group, so it is applied once per group instead of once per point, which saves about a
        third of the encoder's arithmetic without changing the result beyond float rounding.
        """
        conv0, bn0, conv1, conv2, _, _ = self._layers()
        # The first layer's output is its bias plus a small signal (groups are centred: millimetres against biases
        # of order 0.1), and the BatchNorm after it divides by that signal's spread. In bf16 the signal drowns in
        # the bias' rounding (measured: 50% relative error after the norm, 26% in the tokens), so this 3→128
        # layer and its norm, a negligible share of the work, stay in float32 under any autocast.
        with torch.autocast(x.device.type, enabled=False):
            first = torch.relu(self._norm(self._dense(x, conv0), bn0, *stats0))
        local = self._dense(first, conv1)  # (g,K,256)
        pooled = local.amax(dim=1)  # (g,256)
        weight = conv2.weight[..., 0]
        width = pooled.shape[-1]
        return F.linear(local, weight[:, width:]) + F.linear(pooled, weight[:, :width], conv2.bias)[:, None]

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """(G,K,3) centred groups of one cloud → (G,C) tokens.

        Groups are processed ``_GROUP_CHUNK`` at a time to bound memory. In ``cloud`` mode the chunks must not
        change the statistics: the first BatchNorm's come in closed form from the points
        (:meth:`_input_statistics`); the second's need the hidden activations of every group, so with more than
        one chunk a first pass collects per-chunk mean and variance (merged by :func:`_combine_statistics`) and
        a second pass recomputes the activations and normalises them.
        """
        _, bn0, _, _, bn1, conv3 = self._layers()
        if groups.shape[0] == 0:
            return groups.new_zeros(0, conv3.out_channels)
        starts = range(0, groups.shape[0], _GROUP_CHUNK)
        cloud = self.batchnorm == "cloud"
        stats0 = self._input_statistics(groups) if cloud else self._running(bn0)
        stats1: tuple[torch.Tensor, torch.Tensor] | None = self._running(bn1)
        if cloud:  # one chunk: its own statistics are the cloud's, taken below without a second pass
            stats1 = None if len(starts) == 1 else self._hidden_statistics(groups, stats0)
        outputs = []
        for start in starts:
            hidden = self._hidden(groups[start : start + _GROUP_CHUNK], stats0)
            if stats1 is None:  # statistics in float32 even under a low-precision autocast (a no-op in fp32)
                var, mean = torch.var_mean(hidden.flatten(0, 1).float(), dim=0, correction=0)
                stats1 = (mean, var)
            hidden = torch.relu(self._norm(hidden, bn1, *stats1))
            outputs.append(self._dense(hidden, conv3).amax(dim=1))
        return torch.cat(outputs)

    def _hidden_statistics(
        self, groups: torch.Tensor, stats0: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """First pass: the second BatchNorm's cloud mean and biased variance, one chunk of groups at a time."""
        parts = []
        for start in range(0, groups.shape[0], _GROUP_CHUNK):
            hidden = self._hidden(groups[start : start + _GROUP_CHUNK], stats0).flatten(0, 1).float()
            var, mean = torch.var_mean(hidden, dim=0, correction=0)
            parts.append((var, mean, hidden.shape[0]))
        mean64, var64 = _combine_statistics(parts)
        return mean64.to(groups.dtype), var64.to(groups.dtype)


class Block(nn.Module):
    """Pre-LN block with PyTorch's default LayerNorm eps (1e-5), as Point-MAE.

    DropPath has no parameters; the caller passes the factors of the two residual branches (1 = identity, the
    expected value; see :func:`sample_drop_path`). A dropped branch (factor 0) is not computed.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, factors: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        attn_factor, mlp_factor = factors
        if attn_factor != 0.0:
            branch = self.attn(self.norm1(x))
            x = x + (branch if attn_factor == 1.0 else branch * attn_factor)
        if mlp_factor != 0.0:
            branch = self.mlp(self.norm2(x))
            x = x + (branch if mlp_factor == 1.0 else branch * mlp_factor)
        return x


class BlockStack(nn.Module):
    """Holder so the keys read ``blocks.blocks.{i}`` like the checkpoint's ``TransformerEncoder``."""

    def __init__(self, count: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(count))


class PointMaeEncoder(nn.Module):
    """Mini-PointNet + positional MLP + the kept transformer blocks + final LayerNorm.

    ``dim``/``num_heads`` exist only so tests can use a narrow model; the released checkpoint is 384/6.
    ``batchnorm`` selects the Mini-PointNet's statistics (:data:`BATCHNORM_MODES`); the module's train/eval flag
    plays no part, so the forward is the same either way.
    """

    def __init__(
        self,
        keep_blocks: int = DEPTH,
        layers: tuple[int, ...] = (3, 7, 11),
        *,
        dim: int = TRANS_DIM,
        num_heads: int = NUM_HEADS,
        batchnorm: str = "cloud",
    ) -> None:
        super().__init__()
        if not 1 <= keep_blocks <= DEPTH:
            raise ValueError(f"keep_blocks must be in [1, {DEPTH}], got {keep_blocks}")
        if not layers or any(not 0 <= layer < keep_blocks for layer in layers):
            raise ValueError(f"output layers {layers} must be within the {keep_blocks} kept blocks")
        self.layers = tuple(layers)
        self.dim = dim
        self.encoder = MiniPointNet(dim, batchnorm)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = BlockStack(keep_blocks, dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    @property
    def batchnorm(self) -> str:
        """The Mini-PointNet's BatchNorm mode."""
        return self.encoder.batchnorm

    def forward(
        self, neighborhoods: torch.Tensor, centres: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(G,K,3) centred groups and (G,3) centres → (G, dim·len(layers)) features.

        Without ``generator`` DropPath takes its expected value (identity); with one, it is drawn from it as the
        official training-mode forward does (:func:`sample_drop_path`).
        """
        blocks = self.blocks.blocks
        if generator is None:
            factors = [(1.0, 1.0)] * len(blocks)
        else:
            factors = sample_drop_path(drop_path_rates(len(blocks)), generator)
        x = self.encoder(neighborhoods)[None]
        pos = self.pos_embed(centres)[None]
        picked = []
        for index, block in enumerate(blocks):
            x = block(x + pos, factors[index])
            if index in self.layers:
                picked.append(self.norm(x))
        return torch.cat(picked, dim=-1)[0]


#: Keys of other checkpoints' heads: the pre-training decoder, and GLFM's Stage-I segmentation head (``classify.*``,
#: saved with its adapted ``pointmae_adapted.pth``), which no extractor uses.
_UNUSED_PREFIXES = ("MAE_decoder.", "decoder_pos_embed.", "increase_dim.", "mask_token", "classify.")


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

    The defaults compute the features the official scripts compute: BatchNorm with the cloud's statistics (the
    model's ``batchnorm``), DropPath at its expected value, and only points with three non-zero coordinates.

    Args:
        model: The encoder; its ``batchnorm`` mode is part of :meth:`config`.
        preset: Grouping and pruning settings (may carry test-size overrides).
        weights_id: SHA-256 of the weights file, or ``random-<seed>``.
        fps_backend: See :func:`~mmiad.features.grouping.farthest_point_sample`.
        drop_path: ``expected`` (identity, deterministic) or ``sampled`` (the official random DropPath). Sampled
            draws come from a generator seeded by ``drop_path_seed`` and the cloud's coordinates, so a cloud gets
            the same features whenever and in whatever order it is extracted (and the feature cache stays valid);
            the draws are not the official run's, which came from the global CUDA generator.
        drop_path_seed: Seed of the sampled DropPath (recorded in :meth:`config`).
        nonzero: Which points feed the features (:data:`~mmiad.features.base.NONZERO_RULES`); ``all`` is the
            official rule.
        regroup: GLFM's two-step smoothing: each group's feature becomes the mean, over the group's members, of
            the features propagated to the points by the 3-NN weights (:func:`~mmiad.features.grouping.regroup_mean`)
            instead of the raw token. Off by default (CFM, M3DM, Uni-RCM use the tokens).
        fps_start: ``first`` (default: index 0, deterministic, as CFM's CUDA FPS) or ``random`` (CMDR-IAD's
            pure-PyTorch FPS). The random start is drawn from a generator seeded by ``fps_seed`` and the cloud's
            coordinates, so a cloud always gets the same start (the feature cache stays valid); the official code
            draws it from the global torch generator, so it differs per run and per epoch there.
        fps_seed: Seed of the random start (recorded in :meth:`config` with it).

    Attributes:
        out_channels: 384 × number of output layers (1152 for the papers' preset).
    """

    def __init__(
        self,
        model: PointMaeEncoder,
        preset: PointMaePreset,
        weights_id: str,
        fps_backend: str = "auto",
        *,
        drop_path: str = "expected",
        drop_path_seed: int = 0,
        nonzero: str = "all",
        regroup: bool = False,
        fps_start: str = "first",
        fps_seed: int = 0,
    ) -> None:
        if tuple(preset.layers) != model.layers or preset.keep_blocks != len(model.blocks.blocks):
            raise ValueError(f"preset {preset.name} does not match the model's layers/blocks")
        if drop_path not in DROP_PATH_MODES:
            raise ValueError(f"drop_path must be one of {DROP_PATH_MODES}, got {drop_path!r}")
        if nonzero not in NONZERO_RULES:
            raise ValueError(f"nonzero must be one of {NONZERO_RULES}, got {nonzero!r}")
        if fps_start not in FPS_STARTS:
            raise ValueError(f"fps_start must be one of {FPS_STARTS}, got {fps_start!r}")
        self.fps_start = fps_start
        self.fps_seed = int(fps_seed)
        self.model = model.eval().requires_grad_(False)
        self.preset = preset
        self.weights_id = weights_id
        self.fps_backend = fps_backend
        self.drop_path = drop_path
        self.drop_path_seed = int(drop_path_seed)
        self.nonzero = nonzero
        self.regroup = bool(regroup)
        self.out_channels = model.dim * len(preset.layers)

    def config(self) -> dict[str, Any]:
        """Everything that changes the features (the FPS backend does not: both give identical indices)."""
        settings = {k: v for k, v in asdict(self.preset).items() if k != "weights"}  # candidates only
        modes: dict[str, Any] = {"batchnorm": self.model.batchnorm, "drop_path": self.drop_path}
        if self.drop_path == "sampled":
            modes["drop_path_seed"] = self.drop_path_seed
        if self.regroup:  # only when on, so the other presets' configs (and cache keys) stay as they were
            modes["regroup"] = True
        if self.fps_start != "first":  # absent at the default, so existing caches and model files stay valid
            modes.update(fps_start=self.fps_start, fps_seed=self.fps_seed)
        return {"kind": "pointmae", **settings, "weights": self.weights_id, **modes, "nonzero": self.nonzero}

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are, hence where grouping, encoder and interpolation weights compute."""
        return self.model.norm.weight.device

    def to(self, device: torch.device | str) -> PointMaeExtractor:
        """Move the encoder to ``device`` (see :class:`~mmiad.features.base.DeviceExtractor`); returns self."""
        self.model.to(device)
        return self

    def _group(
        self, points: torch.Tensor, on_device: torch.Tensor, grouping: GroupingFn | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre and member indices on the encoder's device.

        FPS + kNN run where the points are: on the CPU the default NumPy FPS and k-d tree (unchanged), elsewhere
        the torch FPS and brute-force kNN, which give the same indices (:mod:`mmiad.features.grouping`). A
        replacement grouping gets the CPU points, as it always did, and its indices are moved.
        """
        if grouping is not None:
            centre_idx, member_idx = grouping(points, self.preset.num_group, self.preset.group_size)
            return centre_idx.to(on_device.device), member_idx.to(on_device.device)
        if self.fps_start == "first":
            return knn_group_indices(
                on_device, self.preset.num_group, self.preset.group_size, fps_backend=self.fps_backend
            )
        # A random start: FPS from index 0 of the cloud rotated to begin at the drawn point, indices rotated back.
        start = int(torch.randint(points.shape[0], (1,), generator=self._seeded(self.fps_seed, points)))
        order = (torch.arange(points.shape[0], device=on_device.device) + start) % points.shape[0]
        centre_idx, member_idx = knn_group_indices(
            on_device[order], self.preset.num_group, self.preset.group_size, fps_backend=self.fps_backend
        )
        return order[centre_idx], order[member_idx]

    @staticmethod
    def _seeded(seed: int, points: torch.Tensor) -> torch.Generator:
        """A generator seeded by ``seed`` and the cloud's coordinates (the same cloud, the same draws)."""
        digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True))
        digest.update(points.numpy().tobytes())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") >> 1)

    def _generator(self, points: torch.Tensor) -> torch.Generator | None:
        """The sampled DropPath's generator for one cloud: seeded by the recorded seed and the coordinates."""
        if self.drop_path == "expected":
            return None
        return self._seeded(self.drop_path_seed, points)

    def extract(self, xyz: np.ndarray, valid: np.ndarray) -> PointFeatures:
        """Features for one S×S organized cloud; pixels outside ``valid`` are ignored.

        Of the ``valid`` pixels, only those passing the ``nonzero`` rule are used (and listed in ``pixel_index``).
        A cloud with no such point gives zero group features and zero pixels (its dense map is all zeros). The
        result is on :attr:`device` (the pipeline brings it back to the CPU).
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
        pixel_index = np.flatnonzero(feature_points(xyz, valid, self.nonzero).reshape(-1))
        points = torch.from_numpy(np.ascontiguousarray(xyz.reshape(-1, 3)[pixel_index], dtype=np.float32))
        if not torch.isfinite(points).all():
            raise ValueError("valid points must have finite coordinates")
        device = self.device
        on_device = points.to(device)  # the same tensor on the CPU
        centre_idx = torch.zeros(0, dtype=torch.long, device=device)
        member_idx = torch.zeros(0, self.preset.group_size, dtype=torch.long, device=device)
        with torch.inference_mode():
            if points.shape[0] == 0:
                features = torch.zeros(0, self.out_channels, device=device)
                neighbors = torch.zeros(0, 3, dtype=torch.long, device=device)
                weights = torch.zeros(0, 3, device=device)
            else:
                # Grouping and interpolation weights are geometry: a low-precision autocast (--precision) applies
                # to the encoder only, so the groups and the projection are the same in every precision.
                with torch.autocast(device.type, enabled=False):
                    centre_idx, member_idx = self._group(points, on_device, grouping)
                    centres = on_device[centre_idx]
                    neighborhoods = on_device[member_idx] - centres[:, None, :]
                    neighbors, weights = three_nn_weights(on_device, centres)
                features = self.model(neighborhoods, centres, self._generator(points))
                if self.regroup:
                    features = regroup_mean(features, neighbors, weights, member_idx)
        # Clone out of inference mode: inference tensors cannot be used by later autograd (CFM training).
        point_features = PointFeatures(
            features=features.clone(),
            pixel_index=torch.from_numpy(pixel_index.astype(np.int64)).to(device),
            neighbors=neighbors.clone(),
            weights=weights.clone(),
            grid_size=size,
        )
        return PointGroups(point_features, on_device, centre_idx.clone(), member_idx.clone(), self.model.dim)
