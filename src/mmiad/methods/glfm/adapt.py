"""GLFM's Stage I: adapt Point-MAE to industrial clouds by segmenting synthetic stretch anomalies (``train.py``).

The whole 12-block Point-MAE plus a per-point head (Linear 384→2, softmax) learns to find the points a
:mod:`~mmiad.methods.glfm.synthesis` stretch moved. Block 11's normed output is propagated to every point by the
3-NN inverse-squared-distance weights, the head classifies each point, and the loss is Focal (γ 2, label
smoothing 1e-5, on the softmax outputs) plus soft Dice (smooth 1) on the anomaly probability. Adam, lr 1e-4,
one cloud per step, 100 steps per "epoch", every class mixed. The network runs in training mode: BatchNorm
normalises with the current cloud's statistics and updates its running statistics (momentum 0.1), which
inference then uses in eval mode, and DropPath is active (drawn from a seeded generator here).

Only blocks 0-1, the Mini-PointNet, the positional MLP and the final LayerNorm serve at inference; they change
through back-propagation from block 11.

The released script multiplies the learning rate by 1e-5 at epoch 40 and by 1e-6 at epoch 80 on an undefined
``optimizer_Adam``, so it crashes when epoch 40 starts. mmiad does what it evidently intends: the same
multiplications on the optimiser that trains (``lr_decay``), over the planned 100 epochs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmiad.features.grouping import knn_group_indices, three_nn_weights
from mmiad.features.pointmae import (
    DEPTH,
    MiniPointNet,
    PointMaeEncoder,
    PointMaeExtractor,
    drop_path_rates,
    sample_drop_path,
)
from mmiad.methods.glfm.synthesis import stretch_anomaly
from mmiad.utils.threads import single_thread_on_cpu

FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5
DICE_SMOOTH = 1.0
#: ``(epoch, factor)``: the released script's learning-rate multiplications, applied as it intends.
OFFICIAL_LR_DECAY: tuple[tuple[int, float], ...] = ((40, 1e-5), (80, 1e-6))


def focal_loss(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official ``FocalLoss`` on (N,2) softmax outputs and (N,) 0/1 targets (α = 1, γ = 2, smooth 1e-5).

    The one-hot target is clamped to [1e-5, 1 − 1e-5], ``pt = Σ onehot·p + 1e-5`` and the loss is the mean of
    ``−(1 − pt)² · log pt``.
    """
    one_hot = torch.nn.functional.one_hot(target.long(), probabilities.shape[1]).to(probabilities.dtype)
    one_hot = one_hot.clamp(FOCAL_SMOOTH / (probabilities.shape[1] - 1), 1.0 - FOCAL_SMOOTH)
    pt = (one_hot * probabilities).sum(dim=1) + FOCAL_SMOOTH
    return (-((1.0 - pt) ** FOCAL_GAMMA) * pt.log()).mean()


def dice_loss(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official ``BinaryDiceLoss`` for one cloud: ``1 − (2Σp·y + 1) / (Σp + Σy + 1)``."""
    target = target.to(probability.dtype)
    return 1.0 - (2.0 * (probability * target).sum() + DICE_SMOOTH) / (probability.sum() + target.sum() + DICE_SMOOTH)


def train_tokens(encoder: MiniPointNet, groups: torch.Tensor) -> torch.Tensor:
    """(G,K,3) centred groups → (G,C) tokens through the Mini-PointNet's own modules (official ``Encoder``).

    Unlike :meth:`MiniPointNet.forward`, the BatchNorm layers run as modules, so in training mode they normalise
    with the batch statistics and update their running statistics, as the official training does.
    """
    count = groups.shape[1]
    features = encoder.first_conv(groups.transpose(1, 2))  # (G,256,K)
    pooled = features.amax(dim=2, keepdim=True)
    features = torch.cat([pooled.expand(-1, -1, count), features], dim=1)
    return encoder.second_conv(features).amax(dim=2)


def segmentation_forward(
    model: PointMaeEncoder,
    head: nn.Module,
    points: torch.Tensor,
    num_group: int,
    group_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """(N,2) per-point probabilities of one cloud: last block → 3-NN propagation → head (softmax)."""
    with torch.no_grad():
        centre_idx, member_idx = knn_group_indices(points, num_group, group_size)
        centres = points[centre_idx]
        neighborhoods = points[member_idx] - centres[:, None, :]
        neighbors, weights = three_nn_weights(points, centres)
    factors = sample_drop_path(drop_path_rates(len(model.blocks.blocks)), generator)
    x = train_tokens(model.encoder, neighborhoods)[None]
    pos = model.pos_embed(centres)[None]
    for index, block in enumerate(model.blocks.blocks):
        x = block(x + pos, factors[index])
    tokens = model.norm(x)[0]  # (G,C)
    propagated = (tokens[neighbors] * weights[..., None]).sum(dim=1)  # (N,C)
    return torch.softmax(head(propagated), dim=-1)


@dataclass
class AdaptationResult:
    """What Stage I produced: the adapted encoder's weights (all 12 blocks and the head) and the loss per epoch."""

    state: dict[str, torch.Tensor]
    loss_history: list[float]
    steps: int


def trainable_copy(extractor: PointMaeExtractor, base: PointMaeEncoder | None) -> PointMaeEncoder:
    """The full 12-block encoder Stage I trains, from ``base`` (the pre-training weights) when given."""
    model = PointMaeEncoder(DEPTH, (DEPTH - 1,), dim=extractor.model.dim, batchnorm="cloud")
    if base is not None:
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in base.state_dict().items() if k in own}, strict=True)
    return model


def adapt(
    model: PointMaeEncoder,
    clouds: Sequence[Callable[[], np.ndarray]],
    *,
    num_group: int,
    group_size: int,
    epochs: int,
    steps_per_epoch: int,
    learning_rate: float,
    seed: int,
    unit_m: float,
    device: torch.device,
    lr_decay: Sequence[tuple[int, float]] = OFFICIAL_LR_DECAY,
    progress: bool = False,
) -> AdaptationResult:
    """Train ``model`` (in place) and a fresh head on synthetic anomalies of ``clouds`` (loaders of (N,3) points).

    Each epoch visits a fresh random order of the clouds and stops after ``steps_per_epoch`` of them, one
    optimiser step per cloud, each with a new synthetic anomaly; everything random comes from ``seed``. On a
    CPU the training runs on one thread: the multi-threaded backward of the convolutions and BatchNorm sums in
    an order that varies between runs, and the same seed must give the same weights.
    """
    if not clouds:
        raise ValueError("Stage I needs at least one training cloud")
    with single_thread_on_cpu(device):
        torch.manual_seed(seed)
        head = nn.Linear(model.dim, 2)
        model.to(device).train()
        head.to(device).train()
        optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=learning_rate)
        rng = np.random.default_rng(seed)
        generator = torch.Generator().manual_seed(seed)
        decay = dict(lr_decay)
        history: list[float] = []
        steps = 0
        for epoch in tqdm(range(epochs), desc="glfm stage I", disable=not progress, leave=False):
            if epoch in decay:
                for group in optimizer.param_groups:
                    group["lr"] *= decay[epoch]
            losses = []
            for index in rng.permutation(len(clouds))[:steps_per_epoch].tolist():
                moved, mask, _ = stretch_anomaly(clouds[index](), rng, unit_m)
                points = torch.from_numpy(moved).to(device)
                probabilities = segmentation_forward(model, head, points, num_group, group_size, generator)
                target = torch.from_numpy(mask).to(device)
                loss = focal_loss(probabilities, target) + dice_loss(probabilities[:, 1], target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                steps += 1
            history.append(float(np.mean(losses)))
        model.eval()
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state.update({f"classify.0.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()})
        return AdaptationResult(state, history, steps)


def inference_state(extractor: PointMaeExtractor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of an adapted state the (2-block) extractor holds: every one of its keys, nothing else."""
    own = extractor.model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise KeyError(f"the adapted weights lack {missing[:5]}")
    return {k: state[k] for k in own}


def weights_id(state: dict[str, torch.Tensor]) -> str:
    """``glfm-adapted-`` + SHA-256 of the tensors (names, shapes, bytes): the extractor's weights id."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return f"glfm-adapted-{digest.hexdigest()[:32]}"


def install(extractor: PointMaeExtractor, state: dict[str, torch.Tensor]) -> str:
    """Load adapted weights into the extractor (strictly, on its device) and give it their id; returns the id."""
    kept = inference_state(extractor, state)
    extractor.model.load_state_dict(kept, strict=True)
    extractor.weights_id = weights_id(kept)
    return extractor.weights_id
