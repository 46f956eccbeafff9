"""Checkpoints written by the official CMDR-IAD ``train.py``: four state dicts per category.

``train.py`` saves, after the last epoch, ``{map2Dto3D|map3Dto2D|Dec2D|Dec3D}_<class>_independent_<E>ep_<B>bs.pth``
under ``<savepath>/<class>/``: plain ``state_dict``s of ``FeatureMappigMLP``, ``Decoder2D`` and ``Decoder3D``, whose
names and shapes are exactly mmiad's :mod:`mmiad.methods.cmdr.networks`. No trained checkpoints are released (the
README promises them after acceptance), but files from a user's own official run load here. Sizes come from the
tensors: the feature widths from the decoders, the grid from Decoder3D's token-axis Linear (50176 = 224²).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

from torch import nn

from mmiad.features.checkpoints import CheckpointError
from mmiad.methods.cmdr.networks import Decoder2D, Decoder3D, MappingMLP
from mmiad.methods.modelfile import prefixed
from mmiad.methods.official import (
    OfficialImport,
    build_checked,
    files_by_class,
    read_official,
    require_keys,
    source_entry,
)

NAMES = ("map2Dto3D", "map3Dto2D", "Dec2D", "Dec3D")
FILE_PATTERN = re.compile(r"^(map2Dto3D|map3Dto2D|Dec2D|Dec3D)_(.+)_independent_(\d+)ep_(\d+)bs\.pth$")


def find_cmdr_checkpoints(source: str | Path) -> dict[str, dict[str, Path]]:
    """``{class: {"map2Dto3D": path, ..., "Dec3D": path}}`` for a folder (searched recursively) or one file.

    Raises:
        CheckpointError: If no file matches, a class lacks one of the four networks or has one twice, or a class
            name is not plain.
    """
    source = Path(source)
    found = files_by_class(
        source, FILE_PATTERN, "no {map2Dto3D,map3Dto2D,Dec2D,Dec3D}_<class>_independent_<E>ep_<B>bs.pth files"
    )
    incomplete = sorted(
        f"{name} (missing {', '.join(n for n in NAMES if n not in files)})"
        for name, files in found.items()
        if len(files) != len(NAMES)
    )
    if incomplete:
        raise CheckpointError(source, f"classes without all four networks: {'; '.join(incomplete)}")
    return dict(sorted(found.items()))


def import_cmdr_set(paths: dict[str, Path]) -> OfficialImport:
    """One class's four files as mmiad CMDR tensors (official names kept), with the grid and widths they fix."""
    states = {name: read_official(paths[name]) for name in NAMES}
    require_keys(paths["Dec2D"], states["Dec2D"], ("projection.0.weight",), "CMDR-IAD Decoder2D")
    require_keys(paths["Dec3D"], states["Dec3D"], ("projection.0.weight", "decoder.0.weight"), "CMDR-IAD Decoder3D")
    channels_2d = int(states["Dec2D"]["projection.0.weight"].shape[1])
    channels_3d = int(states["Dec3D"]["decoder.0.weight"].shape[0])
    tokens = int(states["Dec3D"]["projection.0.weight"].shape[1])
    grid = math.isqrt(tokens)
    if grid * grid != tokens or grid % 8:
        raise CheckpointError(
            paths["Dec3D"], f"its {tokens}-token axis is not a square grid with a side divisible by 8"
        )
    builders: dict[str, Callable[[], nn.Module]] = {
        "map2Dto3D": lambda: MappingMLP(channels_2d, channels_3d),
        "map3Dto2D": lambda: MappingMLP(channels_3d, channels_2d),
        "Dec2D": lambda: Decoder2D(channels_2d, grid),
        "Dec3D": lambda: Decoder3D(channels_3d, grid),
    }
    tensors = {}
    for name in NAMES:
        # every key and shape checked on the meta device first (one error per file), then finite, then built
        network = build_checked(paths[name], builders[name], states[name])
        tensors.update(prefixed(network.state_dict(), name))
    match = FILE_PATTERN.match(paths["Dec3D"].name)
    assert match is not None
    return OfficialImport(
        hparams={"modality": "both", "grid_size": grid},
        channels=(channels_2d, channels_3d),
        tensors=tensors,
        sources=[source_entry(paths[name]) for name in NAMES],
        facts={"epochs": int(match.group(3)), "batch_size": int(match.group(4))},
    )
