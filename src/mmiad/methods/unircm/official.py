"""The authors' released Uni-RCM files: the unified model and its ORQ codebooks.

* ``UniRCM_<name>_<E>ep_<B>bs_h<H>_L<N>.pth`` (``uni_rcm_train.py``): the plain ``state_dict`` of
  ``UniRCM_Model``, i.e. two ``UniRCM_Net`` (``models/rcm_nets.py``) under ``net_2d3d.`` (2D→3D) and
  ``net_3d2d.`` (3D→2D). :class:`~mmiad.methods.unircm.blocks.RefGuidedMapping` uses the same parameter names,
  buffers (position encodings, BatchNorm statistics) and shapes, so the tensors load strictly. Grid, hidden size
  and block count are read from the tensors (the file name may have been changed).
* ``UniRCM_ORQ_<name>_Krgb<K>_Kxyz<K>[_L<L>]_iter<I>.pth`` (``uni_rcm_extract_orq.py``): a dict with metadata
  and ``rgb_codebook`` / ``xyz_codebook``, the ``state_dict`` of a ``ResidualVectorQuantizer``
  (``layers.<i>.{embed, cluster_size, embed_avg, initted}``) or, with one layer, of a ``VectorQuantizer``
  (``embed, cluster_size, embed_avg, initted``). Only ``embed`` (K×D) is used at inference; the official loader
  is strict, so the other buffers must be present too.

Without an ORQ file the model scores with the mapping alone, as the official inference does when
``--orq_checkpoint`` is empty.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmiad.features.checkpoints import CheckpointError, check_finite
from mmiad.methods.modelfile import prefixed
from mmiad.methods.official import (
    OfficialImport,
    build_checked,
    count_indexed,
    find_files,
    read_official,
    require_keys,
    source_entry,
)
from mmiad.methods.unircm.blocks import RefGuidedMapping

MODEL_PATTERN = re.compile(r"^UniRCM_(?!ORQ_)(.+)_(\d+)ep_(\d+)bs_h(\d+)_L(\d+)\.pth$")
ORQ_PATTERN = re.compile(r"^UniRCM_ORQ_.+\.pth$")
_CODE_BUFFERS = ("embed", "cluster_size", "embed_avg", "initted")


def find_unircm_files(source: str | Path, orq: str | Path | None = None) -> tuple[Path, Path | None]:
    """(model file, ORQ file or None): ``source`` is the model file or a folder holding one of each at most.

    An explicit ``orq`` path wins over searching; a folder with several candidates is an error listing them.
    """
    source = Path(source)
    if source.is_file():
        model = source
    else:
        candidates = find_files(source, MODEL_PATTERN)
        if len(candidates) != 1:
            what = "no" if not candidates else f"{len(candidates)}"
            listed = "" if not candidates else ": " + ", ".join(str(p) for p in candidates)
            raise CheckpointError(source, f"{what} UniRCM_<name>_<E>ep_<B>bs_h<H>_L<N>.pth files found{listed}")
        model = candidates[0]
    if orq is not None:
        return model, Path(orq)
    if source.is_file():
        return model, None
    books = find_files(source, ORQ_PATTERN)
    if len(books) > 1:
        raise CheckpointError(source, f"several ORQ files found, choose one: {', '.join(str(p) for p in books)}")
    return model, (books[0] if books else None)


class _OfficialModel(nn.Module):
    """``UniRCM_Model``'s two networks under their official attribute names (for strict checking)."""

    def __init__(self, net_2d3d: RefGuidedMapping, net_3d2d: RefGuidedMapping) -> None:
        super().__init__()
        self.net_2d3d = net_2d3d
        self.net_3d2d = net_3d2d


def _network_shape(path: Path, state: dict[str, Any], prefix: str) -> dict[str, int]:
    """in/out channels, hidden size, grid side and block count of one ``UniRCM_Net`` from its tensors."""
    keys = [f"{prefix}.feat_embed.proj.weight", f"{prefix}.ref_param", f"{prefix}.out_proj.2.weight"]
    require_keys(path, state, keys, "Uni-RCM UniRCM_Model")
    if state[keys[0]].dim() != 2 or state[keys[2]].dim() != 2:
        raise CheckpointError(path, f"{keys[0]} and {keys[2]} must be matrices", mismatched=[])
    hidden, in_features = state[keys[0]].shape
    patches = state[keys[1]].shape[1] if state[keys[1]].dim() == 3 else 0
    grid = math.isqrt(patches)
    if grid * grid != patches or grid == 0:
        raise CheckpointError(path, f"{keys[1]} has shape {tuple(state[keys[1]].shape)}, not (1, G·G, hidden)")
    return {
        "in": int(in_features),
        "out": int(state[keys[2]].shape[0]),
        "hidden": int(hidden),
        "grid": grid,
        "num_blocks": count_indexed(state, f"{prefix}.blocks."),
    }


def load_official_model(path: Path) -> tuple[RefGuidedMapping, RefGuidedMapping]:
    """The (2D→3D, 3D→2D) networks of a released ``UniRCM_*.pth``, checked strictly against the official layout."""
    state = read_official(path)
    shape = _network_shape(path, state, "net_2d3d")
    _network_shape(path, state, "net_3d2d")  # both halves present; other sizes show up as mismatches below
    hidden, grid, blocks = shape["hidden"], shape["grid"], shape["num_blocks"]

    def build() -> _OfficialModel:
        return _OfficialModel(
            RefGuidedMapping(shape["in"], shape["out"], hidden=hidden, grid=grid, num_blocks=blocks),
            RefGuidedMapping(shape["out"], shape["in"], hidden=hidden, grid=grid, num_blocks=blocks),
        )

    model = build_checked(path, build, state)
    return model.net_2d3d.eval(), model.net_3d2d.eval()


def _codebooks(path: Path, state: Any, name: str, dim: int, meta_layers: Any) -> list[torch.Tensor]:
    """The K×D ``embed`` of every layer of one quantizer state, after a strict key and shape check."""
    if not isinstance(state, dict):
        raise CheckpointError(path, f"not a Uni-RCM ORQ file: {name!r} is missing or not a state dict")
    layers = count_indexed(state, "layers.")
    prefixes = [f"layers.{i}." for i in range(layers)] if layers else [""]
    expected = {p + b for p in prefixes for b in _CODE_BUFFERS}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(f"{name}.{k}" for k in expected - set(tensors))
    unexpected = sorted(f"{name}.{k}" for k in set(state) - expected)
    mismatched = []
    for p in prefixes:
        embed = tensors.get(p + "embed")
        if embed is not None and (embed.dim() != 2 or embed.shape[1] != dim):
            mismatched.append(f"{name}.{p}embed: {tuple(embed.shape)} vs (K, {dim})")
    if missing or unexpected or mismatched:
        raise CheckpointError(
            path,
            "ORQ codebooks do not fit the model",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    if isinstance(meta_layers, int) and meta_layers != len(prefixes):
        raise CheckpointError(path, f"vq_layers says {meta_layers} but {name} holds {len(prefixes)} layers")
    books = {f"{name}.{p}embed": tensors[p + "embed"] for p in prefixes}
    check_finite(path, books)
    for key, book in books.items():  # no code, or only zero codes: every row would quantize to nothing
        if book.shape[0] == 0 or not bool(book.any()):
            raise CheckpointError(path, f"{key} is an empty codebook ({book.shape[0]} codes, all zero or none)")
    return [book.float().clone() for book in books.values()]


def load_official_orq(path: Path, dim_2d: int, dim_3d: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(2D codebooks, 3D codebooks) of a released ORQ file, one K×D tensor per residual layer."""
    checkpoint = read_official(path)
    if "rgb_codebook" not in checkpoint or "xyz_codebook" not in checkpoint:
        raise CheckpointError(
            path, "not a Uni-RCM ORQ file", missing=[k for k in ("rgb_codebook", "xyz_codebook") if k not in checkpoint]
        )
    layers = checkpoint.get("vq_layers")
    books_2d = _codebooks(path, checkpoint["rgb_codebook"], "rgb_codebook", dim_2d, layers)
    books_3d = _codebooks(path, checkpoint["xyz_codebook"], "xyz_codebook", dim_3d, layers)
    return books_2d, books_3d


def import_unircm(source: str | Path, orq: str | Path | None = None) -> OfficialImport:
    """A released Uni-RCM model (and ORQ file, when found or given) as mmiad Uni-RCM tensors."""
    model_path, orq_path = find_unircm_files(source, orq)
    net_2d3d, net_3d2d = load_official_model(model_path)
    tensors = {
        **prefixed(net_2d3d.state_dict(), "map_to_3d"),
        **prefixed(net_3d2d.state_dict(), "map_to_2d"),
    }
    hparams: dict[str, Any] = {
        "grid_size": net_2d3d.grid,
        "hidden": int(net_2d3d.ref_param.shape[2]),
        "num_blocks": len(net_2d3d.blocks),
        "branches": "rfi+ram",
        "use_orq": orq_path is not None,
    }
    sources = [source_entry(model_path)]
    if orq_path is not None:
        books_2d, books_3d = load_official_orq(orq_path, net_2d3d.in_features, net_3d2d.in_features)
        if len(books_2d) != len(books_3d):
            raise CheckpointError(orq_path, f"{len(books_2d)} RGB but {len(books_3d)} XYZ codebook layers")
        tensors.update({f"orq_2d.{i}": book for i, book in enumerate(books_2d)})
        tensors.update({f"orq_3d.{i}": book for i, book in enumerate(books_3d)})
        hparams.update(orq_layers=len(books_2d), codebook_size_2d=len(books_2d[0]), codebook_size_3d=len(books_3d[0]))
        sources.append(source_entry(orq_path))
    facts: dict[str, Any] = {}
    match = MODEL_PATTERN.match(model_path.name)
    if match:
        facts = {"name": match.group(1), "epochs": int(match.group(2)), "batch_size": int(match.group(3))}
    return OfficialImport(
        hparams=hparams,
        channels=(net_2d3d.in_features, net_3d2d.in_features),
        tensors=tensors,
        sources=sources,
        facts=facts,
    )
