"""Helpers the feature tests share: random Point-MAE tensors and a small scanner-like organized cloud.

Imported by module name (pytest puts this folder on ``sys.path`` for the test modules and the conftest here).
"""

from __future__ import annotations

import numpy as np
import torch

from mmiad.features.pointmae import PointMaeEncoder


def randomise(model: PointMaeEncoder, seed: int) -> dict[str, torch.Tensor]:
    """Random values for every tensor, BatchNorm statistics included (variances kept positive)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=generator) * 0.2
    return state


def cloud(size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A scanner-like surface (5 cm wide, 50 cm away) with a few invalid pixels."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size))
    xyz = np.stack([u * 0.05, v * 0.05, 0.5 + 0.01 * np.sin(3 * u) + 1e-3 * rng.normal(size=u.shape)], axis=-1)
    valid = np.ones((size, size), bool)
    valid[:3, :5] = False
    return xyz.astype(np.float32), valid
