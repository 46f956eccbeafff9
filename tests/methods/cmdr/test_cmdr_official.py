"""``mmiad import --method cmdr``: files in the official ``train.py`` layout give the official inference's score.

The reference below re-derives the official ``inference.py`` with plain float64 torch functions from the four state
dicts (PyTorch's own transposed convolutions, eval-mode BatchNorm, the windowed attention, the gate, the confidence
weights, the box filters and the image-score normalisation); nothing in it calls mmiad's networks or scoring.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained
from mmiad.engine.imports import import_run
from mmiad.features.checkpoints import CheckpointError
from mmiad.methods.cmdr.networks import build_networks
from mmiad.methods.cmdr.official import find_cmdr_checkpoints

SIZE = 64  # the tiny preset's image side: grid = image size, so no upsampling (the official path exactly)
C2, C3 = 42, 33  # the weight-free extractors' widths


def official_files(folder: Path, category: str = "puck") -> dict[str, dict[str, torch.Tensor]]:
    """Random weights (BatchNorm statistics included) saved as ``train.py`` names them, under ``<folder>/<class>/``."""
    generator = torch.Generator().manual_seed(7)
    states = {}
    (folder / category).mkdir(parents=True)
    for name, network in build_networks(C2, C3, SIZE).items():
        state = {}
        for key, value in network.state_dict().items():
            if key.endswith("num_batches_tracked"):
                state[key] = value
            elif key.endswith("running_var"):
                state[key] = torch.rand(value.shape, generator=generator) + 0.5
            else:
                state[key] = torch.randn(value.shape, generator=generator) * (0.5 / math.sqrt(max(value.shape[-1], 1)))
        torch.save(state, folder / category / f"{name}_{category}_independent_50ep_1bs.pth")
        states[name] = {k: v.double() for k, v in state.items()}
    return states


def mapper(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = F.gelu(F.linear(x, s["input.weight"], s["input.bias"]))
    for i in (0, 4):
        h = F.gelu(F.linear(h, s[f"projection.{i}.weight"], s[f"projection.{i}.bias"]))
        h = F.layer_norm(h, h.shape[-1:], s[f"projection.{i + 2}.weight"], s[f"projection.{i + 2}.bias"])
    return F.linear(h, s["output.weight"], s["output.bias"])


def batchnorm(s: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(
        x, s[f"{prefix}.running_mean"], s[f"{prefix}.running_var"], s[f"{prefix}.weight"], s[f"{prefix}.bias"]
    )


def decoder_2d(s: dict[str, torch.Tensor], x: torch.Tensor, heads: int = 1, window: int = 128) -> torch.Tensor:
    n = x.shape[0]
    h = mapper_like_projection(s, x)
    r = h.shape[1]
    y = F.layer_norm(h, (r,), s["attn.norm1.weight"], s["attn.norm1.bias"])
    q, k, v = F.linear(y, s["attn.attn.qkv.weight"], s["attn.attn.qkv.bias"]).split(r, dim=1)
    out = torch.zeros_like(y)
    for start in range(0, n, window):
        sl = slice(start, start + window)
        weights = torch.softmax(q[sl] @ k[sl].T / math.sqrt(r // heads), dim=-1)
        out[sl] = weights @ v[sl]
    h = h + F.linear(out, s["attn.attn.proj.weight"], s["attn.attn.proj.bias"])
    y = F.layer_norm(h, (r,), s["attn.norm2.weight"], s["attn.norm2.bias"])
    y = F.linear(
        F.gelu(F.linear(y, s["attn.mlp.0.weight"], s["attn.mlp.0.bias"])), s["attn.mlp.3.weight"], s["attn.mlp.3.bias"]
    )
    image = (h + y).T.reshape(1, r, SIZE, SIZE)
    for conv, norm in ((0, 1), (3, 4), (6, 7)):
        image = F.conv_transpose2d(image, s[f"conv_decoder.{conv}.weight"], s[f"conv_decoder.{conv}.bias"], padding=1)
        image = F.gelu(batchnorm(s, f"conv_decoder.{norm}", image))
    h = image.reshape(r, n).T
    h = F.linear(
        F.gelu(F.linear(h, s["reconstruct.0.weight"], s["reconstruct.0.bias"])),
        s["reconstruct.3.weight"],
        s["reconstruct.3.bias"],
    )
    return F.layer_norm(h, h.shape[-1:], s["reconstruct.4.weight"], s["reconstruct.4.bias"])


def mapper_like_projection(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for i in (0, 4):
        x = F.gelu(F.linear(x, s[f"projection.{i}.weight"], s[f"projection.{i}.bias"]))
        x = F.layer_norm(x, x.shape[-1:], s[f"projection.{i + 2}.weight"], s[f"projection.{i + 2}.bias"])
    return x


def decoder_3d(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = mapper_like_projection(s, x.T)[None]  # (1, C, N/32): the projection runs along the token axis
    for conv, norm in ((0, 1), (3, 4), (6, 7), (9, 10)):
        h = F.conv_transpose1d(h, s[f"decoder.{conv}.weight"], s[f"decoder.{conv}.bias"], stride=2, padding=1)
        h = F.gelu(batchnorm(s, f"decoder.{norm}", h))
    h = torch.tanh(F.conv_transpose1d(h, s["decoder.12.weight"], s["decoder.12.bias"], stride=2, padding=1))
    squeeze = F.relu(F.linear(h.mean(-1), s["attention.1.weight"][..., 0], s["attention.1.bias"]))
    gate = torch.sigmoid(F.linear(squeeze, s["attention.3.weight"][..., 0], s["attention.3.bias"]))
    return (h * gate[..., None])[0].T


def box(image: torch.Tensor, size: int, repeats: int) -> torch.Tensor:
    kernel = torch.full((1, 1, size, size), 1.0 / size**2, dtype=image.dtype)
    x = image[None, None]
    for _ in range(repeats):
        x = F.conv2d(x, kernel, padding=size // 2)
    return x[0, 0]


def official_score(
    states: dict[str, dict[str, torch.Tensor]], f2d: torch.Tensor, f3d: torch.Tensor, fg: torch.Tensor
) -> float:
    """inference.py: four distances, pre-smoothing, gate, confidence weights, Ψ, smoothing, max/sqrt(mean≠0)."""

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).norm(dim=-1)
        return torch.where(fg, d, 0.0).reshape(SIZE, SIZE)

    d_map2d = distance(mapper(states["map3Dto2D"], f3d), f2d)
    d_map3d = distance(mapper(states["map2Dto3D"], f2d), f3d)
    d_rec2d = box(box(distance(decoder_2d(states["Dec2D"], f2d), f2d), 5, 3), 7, 2)
    d_rec3d = distance(decoder_3d(states["Dec3D"], f3d), f3d)
    joint = d_map2d * d_map3d
    sigma = F.avg_pool2d(((joint - joint.mean()) ** 2)[None, None], 7, stride=1, padding=3)[0, 0].sqrt()
    a_map = torch.sigmoid((4.0 + 2.0 * sigma / (sigma.mean() + 1e-8)) * joint) * joint
    w2, w3 = torch.exp(-0.3 * d_rec2d), torch.exp(-0.3 * d_rec3d)
    a_rec = (w2 * d_rec2d + w3 * d_rec3d) / (w2 + w3 + 1e-8)
    psi = torch.where(fg.reshape(SIZE, SIZE), a_map * a_rec, 0.0)
    psi = box(box(psi, 5, 5), 7, 3)
    return float((psi / psi[psi != 0].mean().sqrt()).max())


def test_imported_files_predict_the_official_score(tiny_dataset: Path, tmp_path: Path) -> None:
    states = official_files(tmp_path / "checkpoints")
    hparams = {"extractors": "weightfree", "image_size": SIZE}
    files, _ = import_run(
        "cmdr", tmp_path / "checkpoints", tmp_path / "run", hparams=hparams, cache_dir=str(tmp_path / "c")
    )
    model = load_trained(files["puck"], cache_dir=str(tmp_path / "c")).model
    assert model.grid_ == SIZE and model.channels_ == (C2, C3)
    record = next(r for r in list_records(tiny_dataset, "puck", "test") if r.label == 1)
    prediction = next(iter(model.predict([record])))
    features = model.pipeline.extract(model.pipeline.preprocess([record])[0])
    grid_2d, grid_3d, foreground = features.on_grid(SIZE)
    expected = official_score(
        states, grid_2d.flatten(1).T.double(), grid_3d.flatten(1).T.double(), foreground.flatten()
    )
    assert math.isclose(prediction.pred_score, expected, rel_tol=2e-4)


def test_incomplete_or_foreign_file_sets_are_refused(tmp_path: Path) -> None:
    official_files(tmp_path / "ok")
    (tmp_path / "ok" / "puck" / "Dec3D_puck_independent_50ep_1bs.pth").unlink()
    with pytest.raises(CheckpointError, match="missing Dec3D"):
        find_cmdr_checkpoints(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="no "):
        find_cmdr_checkpoints(tmp_path / "ok" / "puck" / "nothing")
