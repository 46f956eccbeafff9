"""G2SF's released fusion files, loaded instead of synthesising and training (``mmiad import --method g2sf``).

Per class the official trainer writes, under ``Result/<dataset>/<exp>/<class>/fusion/``:
``MMScoringTrainerV2.pth`` (the LSPN ``state_dict``, ``torch.save``), ``score_mean.npy`` (μ, shape (2,)) and
``global_scale.npy`` (raw θ, shape (2, 1)). The banks are not released: they are built from the training data.
The ``.pth`` is read with ``weights_only=True`` and loaded strictly; the ``.npy`` files must be plain numeric
arrays (``allow_pickle=False``): anything else is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmiad.features.checkpoints import CheckpointError, unwrap_state_dict
from mmiad.methods.g2sf.lspn import LSPN
from mmiad.methods.official import build_checked, plain_name, read_official, require_keys

NETWORK = "MMScoringTrainerV2.pth"
MU = "score_mean.npy"
THETA = "global_scale.npy"
_SHAPE_KEYS = ("residual_transformer.network.0.linear.weight", "regressor.0.weight")


def fusion_folder(root: str | Path, category: str) -> Path:
    """The folder holding one class's three files: ``root/<class>/fusion``, ``root/<class>`` or ``root`` itself."""
    root = Path(root)
    name = plain_name(category, root)
    for folder in (root / name / "fusion", root / name, root):
        if all((folder / f).is_file() for f in (NETWORK, MU, THETA)):
            return folder
    raise CheckpointError(root, f"no {NETWORK} + {MU} + {THETA} for {name!r} (looked in <root>/{name}/fusion)")


def read_array(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """A plain float ``.npy`` of ``shape`` with finite values (pickled objects are refused)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise CheckpointError(path, f"not a plain .npy array: {error}") from error
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f" or array.shape != shape:
        raise CheckpointError(path, f"expected a float array of shape {shape}, got {getattr(array, 'shape', None)}")
    if not np.isfinite(array).all():
        raise CheckpointError(path, "non-finite values")
    return torch.from_numpy(array.astype(np.float32))


def load_official_fusion(
    folder: Path, in_dim: int, hidden: int, emb_dim: int, dropout: float
) -> tuple[LSPN, torch.Tensor, torch.Tensor]:
    """(LSPN, θ (2,1), μ (2,)) from one class's fusion folder; the LSPN must fit ``in_dim`` features exactly."""
    path = folder / NETWORK
    state = unwrap_state_dict(read_official(path), ("state_dict", "model"))
    require_keys(path, state, _SHAPE_KEYS, "G2SF LSPN (MultiModalGateNet)")
    network = build_checked(path, lambda: LSPN(in_dim, hidden, emb_dim, dropout), state)
    mu = read_array(folder / MU, (2,))
    if (mu <= 0).any():
        raise CheckpointError(folder / MU, "μ must be positive")
    return network.eval().requires_grad_(False), read_array(folder / THETA, (2, 1)), mu
