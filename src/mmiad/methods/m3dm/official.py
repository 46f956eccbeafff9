"""The UFF checkpoint M3DM's ``fusion_pretrain.py`` writes, loaded instead of training UFF.

``fusion_pretrain.py`` trains ``FeatureFusionBlock(1152, 768)`` (``models/feature_fusion.py``) and saves it with
MAE's ``misc.save_model``: a dict ``{'model': state_dict, 'optimizer', 'epoch', 'scaler', 'args'}``; the
inference code (``feature_extractors/features.py``) reads ``torch.load(path)['model']``. mmiad's
:class:`~mmiad.methods.m3dm.fusion.FeatureFusionBlock` has the same parameter names (``xyz_norm``,
``xyz_mlp.fc1`` …, ``rgb_head``, ``xyz_head``). The official code loads with ``strict=False`` and prints what
did not fit; mmiad loads strictly, so a file that does not fit is an error, not a silently half-random UFF.
"""

from __future__ import annotations

from pathlib import Path

from mmiad.features.checkpoints import check_finite, unwrap_state_dict
from mmiad.methods.m3dm.fusion import FeatureFusionBlock
from mmiad.methods.official import build_checked, read_official, require_keys, tensor_shape

_SHAPE_KEYS = ("xyz_norm.weight", "rgb_norm.weight", "xyz_mlp.fc1.weight")


def uff_state(path: str | Path) -> dict:
    """The UFF ``state_dict`` of a released file (the ``model`` entry of a training checkpoint, or a bare one).

    Its tensors are dense (:func:`~mmiad.methods.official.read_official`) and finite: a NaN weight would only
    surface later, as NaN features refused deep in the memory bank.
    """
    path = Path(path)
    state = unwrap_state_dict(read_official(path), ("model",))
    require_keys(path, state, _SHAPE_KEYS, "M3DM UFF (FeatureFusionBlock)")
    for key in _SHAPE_KEYS[:2]:
        tensor_shape(path, state, key, 1)
    check_finite(path, state)
    return state


def load_official_uff(path: str | Path, xyz_dim: int | None = None, rgb_dim: int | None = None) -> FeatureFusionBlock:
    """A frozen UFF from a released file, for features of ``xyz_dim``/``rgb_dim`` channels (default: the file's).

    Raises:
        CheckpointError: Naming the file, with every missing, unexpected or mis-shaped key (a file for other
            feature sizes shows up as shape mismatches).
    """
    path = Path(path)
    state = uff_state(path)
    xyz = int(state["xyz_norm.weight"].shape[0]) if xyz_dim is None else xyz_dim
    rgb = int(state["rgb_norm.weight"].shape[0]) if rgb_dim is None else rgb_dim
    block = build_checked(path, lambda: FeatureFusionBlock(xyz, rgb), state)  # mlp_ratio 4, as fusion_pretrain.py
    return block.eval().requires_grad_(False)
