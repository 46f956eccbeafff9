"""The authors' released CFM checkpoints: one pair of ``FeatureProjectionMLP`` state dicts per category.

The README links per-class folders holding ``CFM_2Dto3D_<class>_<E>ep_<B>bs.pth`` and
``CFM_3Dto2D_<class>_<E>ep_<B>bs.pth``: plain ``state_dict``s with keys ``input.*``, ``projection.*`` and
``output.*`` (``models/feature_transfer_nets.py``), which are exactly mmiad's :class:`FeatureProjectionMLP`. The
class name comes from the file name; the sizes come from the tensors.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmiad.features.checkpoints import CheckpointError
from mmiad.methods.cfm.mapping import FeatureProjectionMLP
from mmiad.methods.modelfile import prefixed
from mmiad.methods.official import (
    OfficialImport,
    build_checked,
    files_by_class,
    read_official,
    require_keys,
    source_entry,
    tensor_shape,
)

FILE_PATTERN = re.compile(r"^CFM_(2Dto3D|3Dto2D)_(.+)_(\d+)ep_(\d+)bs\.pth$")
_SHAPE_KEYS = ("input.weight", "output.weight")


def find_cfm_checkpoints(source: str | Path) -> dict[str, dict[str, Path]]:
    """``{class: {"2Dto3D": path, "3Dto2D": path}}`` for a folder (per-class subfolders or flat) or one file.

    Raises:
        CheckpointError: If no file matches, a class has one direction only or twice, or a name is not plain.
    """
    source = Path(source)
    found = files_by_class(source, FILE_PATTERN, "no CFM_2Dto3D_<class>_<E>ep_<B>bs.pth / CFM_3Dto2D_... files found")
    incomplete = sorted(f"{name} (only {', '.join(d)})" for name, d in found.items() if len(d) != 2)
    if incomplete:
        raise CheckpointError(source, f"classes without both directions: {', '.join(incomplete)}")
    return dict(sorted(found.items()))


def _load_mlp(path: Path) -> FeatureProjectionMLP:
    state = read_official(path)
    require_keys(path, state, _SHAPE_KEYS, "CFM FeatureProjectionMLP")
    in_features = tensor_shape(path, state, "input.weight", 2)[1]
    out_features = tensor_shape(path, state, "output.weight", 2)[0]
    return build_checked(path, lambda: FeatureProjectionMLP(in_features, out_features), state)


def import_cfm_pair(paths: dict[str, Path]) -> OfficialImport:
    """One class's two files as mmiad CFM tensors (``map_to_3d.*`` = 2D→3D, ``map_to_2d.*`` = 3D→2D)."""
    to_3d, to_2d = _load_mlp(paths["2Dto3D"]), _load_mlp(paths["3Dto2D"])
    if (to_3d.input.in_features, to_3d.output.out_features) != (to_2d.output.out_features, to_2d.input.in_features):
        raise CheckpointError(
            paths["3Dto2D"],
            f"does not pair with {paths['2Dto3D'].name}: the 2D→3D net maps {to_3d.input.in_features}→"
            f"{to_3d.output.out_features} channels, this 3D→2D net {to_2d.input.in_features}→"
            f"{to_2d.output.out_features}",
        )
    match = FILE_PATTERN.match(paths["2Dto3D"].name)
    assert match is not None
    return OfficialImport(
        hparams={"mapping": "crossmodal"},
        channels=(to_3d.input.in_features, to_2d.input.in_features),
        tensors={**prefixed(to_3d.state_dict(), "map_to_3d"), **prefixed(to_2d.state_dict(), "map_to_2d")},
        sources=[source_entry(paths["2Dto3D"]), source_entry(paths["3Dto2D"])],
        facts={"epochs": int(match.group(3)), "batch_size": int(match.group(4))},
    )
