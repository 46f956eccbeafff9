"""Importing the authors' released Uni-RCM model and ORQ codebooks.

The files are written as the official scripts write them (``torch.save(UniRCM_Model.state_dict())`` and the
``uni_rcm_extract_orq.py`` dict), with every key name taken from ``models/rcm_nets.py`` and ``models/quantizer.py``
at tiny sizes (hidden 16, grid 8, one block). The imported model's maps are checked against a functional
re-derivation of the official forward (embedding + PE, RFI with depthwise conv and eval-mode BatchNorm, RAM gate,
α mix, FFN, head), the ORQ residual and the official scoring of ``uni_rcm_infer.py``, which mmiad gives under
``compat=True`` (β2D 0.05, β3D 0.10, ORQ maps zeroed off the foreground and max-normalised per image).
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath

import pytest
import torch
import torch.nn.functional as F

from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained
from mmiad.engine.imports import import_run
from mmiad.features.checkpoints import CheckpointError
from mmiad.methods.modelfile import ModelFileError, load_model_file, save_model_file
from mmiad.methods.unircm.blocks import sincos_position_encoding

C2, C3 = 42, 33  # weight-free 2D and 3D channels
HIDDEN, GRID, BLOCKS = 16, 8, 1
SMALL = {"extractors": "weightfree", "image_size": 64, "device": "cpu"}


def official_pe(dim: int, h: int, w: int) -> torch.Tensor:
    """``PositionalEncoding2D.pe``: column sin/cos interleaved in the first half, row in the second, (1, h·w, dim)."""
    pe = torch.zeros(dim, h, w)
    half = dim // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))
    pos_w, pos_h = torch.arange(0.0, w).unsqueeze(1), torch.arange(0.0, h).unsqueeze(1)
    pe[0:half:2] = torch.sin(pos_w * div).T.unsqueeze(1).expand(-1, h, -1)
    pe[1:half:2] = torch.cos(pos_w * div).T.unsqueeze(1).expand(-1, h, -1)
    pe[half::2] = torch.sin(pos_h * div).T.unsqueeze(2).expand(-1, -1, w)
    pe[half + 1 :: 2] = torch.cos(pos_h * div).T.unsqueeze(2).expand(-1, -1, w)
    return pe.permute(1, 2, 0).reshape(1, h * w, dim)


def official_net_state(g: torch.Generator, c_in: int, c_out: int) -> dict[str, torch.Tensor]:
    """A ``UniRCM_Net(c_in, c_out, GRID², HIDDEN, BLOCKS, GRID, GRID)`` state dict with random (non-init) values."""
    s: dict[str, torch.Tensor] = {}

    def linear(name: str, rows: int, cols: int) -> None:
        s[f"{name}.weight"] = torch.randn(rows, cols, generator=g) / cols**0.5
        s[f"{name}.bias"] = torch.randn(rows, generator=g) * 0.1

    def norm(name: str, dim: int = HIDDEN) -> None:
        s[f"{name}.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        s[f"{name}.bias"] = 0.1 * torch.randn(dim, generator=g)

    h = HIDDEN
    linear("feat_embed.proj", h, c_in)
    norm("feat_embed.norm")
    s["feat_embed.pos_enc.pe"] = official_pe(h, GRID, GRID)
    s["ref_param"] = torch.randn(1, GRID * GRID, h, generator=g) * 0.1
    s["ref_pos.pe"] = official_pe(h, GRID, GRID)
    for b in range(BLOCKS):
        p = f"blocks.{b}."
        norm(p + "feat_norm")
        norm(p + "ref_norm")
        for name in ("rfi_q", "rfi_k", "rfi_v"):
            linear(p + name, h, h)
        s[p + "rfi_local.0.weight"] = torch.randn(h, 1, 3, 3, generator=g) * 0.3
        s[p + "rfi_local.0.bias"] = torch.randn(h, generator=g) * 0.5
        norm(p + "rfi_local.1")
        s[p + "rfi_local.1.running_mean"] = torch.randn(h, generator=g) * 0.2
        s[p + "rfi_local.1.running_var"] = torch.rand(h, generator=g) + 0.5
        s[p + "rfi_local.1.num_batches_tracked"] = torch.tensor(1234)
        linear(p + "rfi_proj", h, h)
        linear(p + "ram_gate.0", h, 2 * h)
        linear(p + "ram_gate.2", h, h)
        linear(p + "ram_proj", h, h)
        s[p + "branch_alpha"] = torch.tensor(0.7)
        norm(p + "ffn_norm")
        linear(p + "ffn.0", 2 * h, h)
        linear(p + "ffn.3", h, 2 * h)
    norm("final_norm")
    linear("out_proj.0", h, h)
    linear("out_proj.2", c_out, h)
    return s


def official_forward(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``UniRCM_Net.forward`` in eval mode on (B, GRID², c_in), with plain torch ops on the state dict."""

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return t @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        mean = t.mean(-1, keepdim=True)
        var = t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-5) * s[f"{name}.weight"] + s[f"{name}.bias"]

    batch, tokens, _ = x.shape
    feat = ln(lin(x, "feat_embed.proj"), "feat_embed.norm") + s["feat_embed.pos_enc.pe"]
    ref = (s["ref_param"] + s["ref_pos.pe"]).expand(batch, -1, -1)
    for b in range(BLOCKS):
        p = f"blocks.{b}."
        feat_n, ref_n = ln(feat, p + "feat_norm"), ln(ref, p + "ref_norm")
        q, k, v = lin(feat_n, p + "rfi_q"), lin(ref_n, p + "rfi_k"), lin(ref_n, p + "rfi_v")
        rfi = (torch.sigmoid(q * k * HIDDEN**-0.5) * v).permute(0, 2, 1).reshape(batch, HIDDEN, GRID, GRID)
        rfi = F.conv2d(rfi, s[p + "rfi_local.0.weight"], s[p + "rfi_local.0.bias"], padding=1, groups=HIDDEN)
        mean, var = s[p + "rfi_local.1.running_mean"], s[p + "rfi_local.1.running_var"]
        rfi = (rfi - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
        rfi = rfi * s[p + "rfi_local.1.weight"].view(1, -1, 1, 1) + s[p + "rfi_local.1.bias"].view(1, -1, 1, 1)
        rfi = lin(rfi.reshape(batch, HIDDEN, tokens).permute(0, 2, 1), p + "rfi_proj")
        gate = torch.sigmoid(lin(F.gelu(lin(torch.cat([feat_n, ref_n], -1), p + "ram_gate.0")), p + "ram_gate.2"))
        ram = lin(gate * feat_n, p + "ram_proj")
        alpha = torch.sigmoid(s[p + "branch_alpha"])
        combined = alpha * rfi + (1 - alpha) * ram
        feat = combined + lin(F.gelu(lin(ln(combined, p + "ffn_norm"), p + "ffn.0")), p + "ffn.3")
    return lin(F.gelu(lin(ln(feat, "final_norm"), "out_proj.0")), "out_proj.2")


def codebook_state(g: torch.Generator, books: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ResidualVectorQuantizer.state_dict()`` (one layer: ``VectorQuantizer.state_dict()``)."""
    state = {}
    prefixes = [f"layers.{i}." for i in range(len(books))] if len(books) > 1 else [""]
    for prefix, book in zip(prefixes, books, strict=True):
        state[prefix + "embed"] = book
        state[prefix + "cluster_size"] = torch.rand(len(book), generator=g) * 10
        state[prefix + "embed_avg"] = book + 0.01
        state[prefix + "initted"] = torch.tensor([True])
    return state


def orq_residual_norm(books: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``ResidualVectorQuantizer.quantize`` distances: nearest code per layer (brute force), final residual norm."""
    residual = rows
    for book in books:
        nearest = torch.cdist(residual.double(), book.double()).argmin(dim=1)
        residual = residual - book[nearest]
    return residual.pow(2).sum(-1).sqrt()


def write_release(root: Path, rows_2d: torch.Tensor, rows_3d: torch.Tensor, layers: int = 2, seed: int = 0) -> dict:
    """The released files in the README's folders: the model and the ORQ codebooks (codes drawn near real rows)."""
    g = torch.Generator().manual_seed(seed)
    nets = {"net_2d3d": official_net_state(g, C2, C3), "net_3d2d": official_net_state(g, C3, C2)}
    model_dir, orq_dir = root / "checkpoints_UniRCM" / "combine", root / "checkpoints_UniRCM_ORQ" / "combine"
    model_dir.mkdir(parents=True)
    orq_dir.mkdir(parents=True)
    torch.save(
        {f"{n}.{k}": v for n, state in nets.items() for k, v in state.items()},
        model_dir / f"UniRCM_combine_200ep_32bs_h{HIDDEN}_L{BLOCKS}.pth",
    )

    def books(rows: torch.Tensor, k: int) -> list[torch.Tensor]:
        picks = rows[torch.randperm(len(rows), generator=g)[:k]]
        first = picks + torch.randn(picks.shape, generator=g) * rows.std() * 0.1
        return [first] + [torch.randn(k, rows.shape[1], generator=g) * rows.std() * 0.2 for _ in range(layers - 1)]

    rgb, xyz = books(rows_2d, 6), books(rows_3d, 5)
    orq = {
        "class_name": "combine",
        "dataset_path": "/data/mvtec3d",
        "num_embeddings_rgb": 6,
        "num_embeddings_xyz": 5,
        "vq_layers": layers,
        "orq_epochs": 20,
        "rgb_dim": C2,
        "xyz_dim": C3,
        "rgb_codebook": codebook_state(g, rgb),
        "xyz_codebook": codebook_state(g, xyz),
        "rgb_utilization": 0.75,
        "xyz_utilization": 0.5,
        "num_rgb_features": len(rows_2d),
        "num_xyz_features": len(rows_3d),
    }
    suffix = f"_L{layers}" if layers > 1 else ""
    torch.save(orq, orq_dir / f"UniRCM_ORQ_combine_Krgb6_Kxyz5{suffix}_iter20.pth")
    return {"nets": nets, "rgb": rgb, "xyz": xyz}


@pytest.fixture(scope="module")
def nominal_rows(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """Foreground feature rows of one training sample (for codebooks near real features) and the cache used."""
    from mmiad.features.registry import build_pipeline

    cache = str(tmp_path_factory.mktemp("cache"))
    pipeline = build_pipeline("weightfree", profile="cfm", image_size=64, cache_dir=cache)
    features = pipeline.extract(list_records(tiny_dataset, "puck", "train")[0])
    grid_2d, grid_3d, foreground = features.on_grid(GRID)
    mask = foreground.flatten()
    return grid_2d.flatten(1).T[mask], grid_3d.flatten(1).T[mask], cache


def test_fresh_position_encoding_is_the_official_buffer() -> None:
    torch.testing.assert_close(sincos_position_encoding(8, 16), official_pe(16, 8, 8)[0], rtol=0, atol=0)


def test_imported_unircm_maps_equal_the_official_forward_and_scoring(
    tiny_dataset: Path, tmp_path: Path, nominal_rows
) -> None:
    rows_2d, rows_3d, cache = nominal_rows
    release = write_release(tmp_path / "release", rows_2d, rows_3d)
    files, _ = import_run(
        "unircm",
        tmp_path / "release",
        tmp_path / "run",
        data_root=tiny_dataset,
        hparams={**SMALL, "compat": True},
        cache_dir=cache,
        fallback=False,
    )
    trained = load_trained(files["unified"], cache_dir=cache)
    model = trained.model
    assert (model.config.grid_size, model.config.hidden, model.config.num_blocks) == (GRID, HIDDEN, BLOCKS)
    assert trained.thresholds is not None and trained.info["categories"] == ["block", "puck"]
    for record in list_records(tiny_dataset, "puck", "test")[:2]:
        features = model.pipeline.extract(record)
        grid_2d, grid_3d, foreground = features.on_grid(GRID)
        rows2, rows3, mask = grid_2d.flatten(1).T, grid_3d.flatten(1).T, foreground.flatten()
        pred_3d = official_forward(release["nets"]["net_2d3d"], rows2[None])[0]
        pred_2d = official_forward(release["nets"]["net_3d2d"], rows3[None])[0]
        cos_3d = (F.normalize(pred_3d, dim=-1) - F.normalize(rows3, dim=-1)).pow(2).sum(-1).sqrt() * mask
        cos_2d = (F.normalize(pred_2d, dim=-1) - F.normalize(rows2, dim=-1)).pow(2).sum(-1).sqrt() * mask
        qe_2d = orq_residual_norm(release["rgb"], rows2).float() * mask
        qe_3d = orq_residual_norm(release["xyz"], rows3).float() * mask
        qe_2d, qe_3d = qe_2d / qe_2d.max(), qe_3d / qe_3d.max()
        combined = (cos_2d + 0.05 * qe_2d) * (cos_3d + 0.10 * qe_3d) * mask
        maps = model.score_grids(rows2, rows3, mask)
        expected = {"2d": cos_2d, "3d": cos_3d, "orq_2d": qe_2d, "orq_3d": qe_3d, "combined": combined}
        for name, reference in expected.items():
            torch.testing.assert_close(maps[name].flatten(), reference, rtol=1e-4, atol=1e-5, msg=name)
        assert float(combined.max()) > 0


def test_single_layer_orq_and_model_without_orq(tmp_path: Path, nominal_rows) -> None:
    rows_2d, rows_3d, cache = nominal_rows
    release = write_release(tmp_path / "release", rows_2d, rows_3d, layers=1)
    files, _ = import_run("unircm", tmp_path / "release", tmp_path / "run", hparams=SMALL, cache_dir=cache)
    tensors, config = load_model_file(files["unified"])
    torch.testing.assert_close(tensors["orq_2d.0"], release["rgb"][0])
    assert "orq_2d.1" not in tensors and "thresholds" not in config
    assert [s["file"] for s in config["imported"]["sources"]][1].startswith("UniRCM_ORQ_")
    model_file = next((tmp_path / "release").rglob("UniRCM_combine_*.pth"))
    files, _ = import_run("unircm", model_file, tmp_path / "no_orq", hparams=SMALL, cache_dir=cache)
    trained = load_trained(files["unified"], cache_dir=cache)
    assert trained.model.orq_2d_ is None and trained.model.config.use_orq is False


def _damage(release: Path, how: str) -> Path:
    model = next(release.rglob("UniRCM_combine_*.pth"))
    orq = next(release.rglob("UniRCM_ORQ_*.pth"))
    target = orq if how.startswith("orq") else model
    state = torch.load(target, weights_only=True)
    if how == "wrong kind":
        state = {"input.weight": torch.ones(3, 3), "output.weight": torch.ones(3, 3)}  # a CFM MLP
    elif how == "missing key":
        del state["net_2d3d.blocks.0.rfi_local.0.bias"]
    elif how == "extra key":
        state["net_3d2d.blocks.0.extra.weight"] = torch.ones(2)
    elif how == "wrong shape":
        state["net_3d2d.ref_pos.pe"] = state["net_3d2d.ref_pos.pe"][:, :, :-4]
    elif how == "not weights-only":
        state["args"] = PurePosixPath("/data")  # an argparse.Namespace is allowed; any other object is refused
    elif how == "orq missing key":
        del state["xyz_codebook"]["layers.1.cluster_size"]
    elif how == "orq wrong dim":
        state["rgb_codebook"]["layers.0.embed"] = state["rgb_codebook"]["layers.0.embed"][:, :-1]
    torch.save(state, target)
    return target


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("wrong kind", r"not a Uni-RCM UniRCM_Model file; missing keys \(3\): net_2d3d.feat_embed.proj.weight"),
        ("missing key", r"missing keys \(1\): net_2d3d.blocks.0.rfi_local.0.bias"),
        ("extra key", r"unexpected keys \(1\): net_3d2d.blocks.0.extra.weight"),
        ("wrong shape", r"shape mismatches \(1\): net_3d2d.ref_pos.pe: \(1, 64, 12\) vs \(1, 64, 16\)"),
        ("not weights-only", r"refusing to unpickle"),
        ("orq missing key", r"missing keys \(1\): xyz_codebook.layers.1.cluster_size"),
        ("orq wrong dim", r"shape mismatches \(1\): rgb_codebook.layers.0.embed: \(6, 41\) vs \(K, 42\)"),
    ],
)
def test_bad_files_give_one_error_naming_the_file(tmp_path: Path, nominal_rows, how: str, expected: str) -> None:
    rows_2d, rows_3d, cache = nominal_rows
    write_release(tmp_path / "release", rows_2d, rows_3d)
    bad = _damage(tmp_path / "release", how)
    with pytest.raises(CheckpointError, match=expected) as error:
        import_run("unircm", tmp_path / "release", tmp_path / "run", hparams=SMALL, cache_dir=cache)
    assert str(error.value).startswith(str(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_model_files_of_the_earlier_layout_are_refused_clearly(tmp_path: Path, nominal_rows) -> None:
    rows_2d, rows_3d, cache = nominal_rows
    write_release(tmp_path / "release", rows_2d, rows_3d)
    files, _ = import_run("unircm", tmp_path / "release", tmp_path / "run", hparams=SMALL, cache_dir=cache)
    tensors, config = load_model_file(files["unified"])
    old = {k.replace(".feat_embed.", ".embed."): v for k, v in tensors.items()}  # the earlier names
    save_model_file(tmp_path / "old.safetensors", old, {k: v for k, v in config.items() if k not in ("format",)})
    with pytest.raises(ModelFileError, match=r"earlier network layout.*Retrain"):
        load_trained(tmp_path / "old.safetensors", cache_dir=cache)
