"""Small released-file sets in the authors' layouts, and the ways a hostile or careless file damages them."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

C2, C3 = 42, 33  # weight-free extractor channels (the real release maps 768 <-> 1152)
#: ``mmiad import`` options for weight-free extractors at a tiny size (seconds, no downloaded weights).
TINY_IMPORT = ["--extractors", "weightfree", "--set", "image_size=64", "--set", "grid_size=32"]


def cfm_state(c_in: int, c_out: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``FeatureProjectionMLP`` state dict as ``CFM_*.pth`` holds it (hidden = (in + out) // 2)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = (c_in + c_out) // 2
    shapes = {"input": (hidden, c_in), "projection": (hidden, hidden), "output": (c_out, hidden)}
    state = {f"{k}.weight": torch.randn(*s, generator=generator) / s[1] ** 0.5 for k, s in shapes.items()}
    state.update({f"{k}.bias": torch.zeros(s[0]) for k, s in shapes.items()})
    return state


def write_cfm_release(root: Path, name: str = "puck") -> dict[str, Path]:
    """``<root>/<name>/CFM_{2Dto3D,3Dto2D}_<name>_250ep_4bs.pth``; returns the two files by direction."""
    folder = root / name
    folder.mkdir(parents=True)
    files = {}
    for direction, (c_in, c_out) in {"2Dto3D": (C2, C3), "3Dto2D": (C3, C2)}.items():
        files[direction] = folder / f"CFM_{direction}_{name}_250ep_4bs.pth"
        torch.save(cfm_state(c_in, c_out), files[direction])
    return files


def uff_state(xyz_dim: int = C3, rgb_dim: int = C2, seed: int = 0) -> dict[str, torch.Tensor]:
    """An M3DM ``FeatureFusionBlock`` state dict, with the shapes of mmiad's block (its names are the official)."""
    from mmiad.methods.m3dm.fusion import FeatureFusionBlock

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in FeatureFusionBlock(xyz_dim, rgb_dim).state_dict().items()}


def orq_file(path: Path, books_2d: list[torch.Tensor], books_3d: list[torch.Tensor]) -> Path:
    """A ``UniRCM_ORQ_*.pth``: residual quantizer states (``layers.<i>.{embed, cluster_size, embed_avg, initted}``)."""

    def quantizer(books: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {}
        for i, book in enumerate(books):
            state.update(
                {
                    f"layers.{i}.embed": book,
                    f"layers.{i}.cluster_size": torch.ones(book.shape[0]),
                    f"layers.{i}.embed_avg": book.clone(),
                    f"layers.{i}.initted": torch.ones(1),
                }
            )
        return state

    checkpoint = {"rgb_codebook": quantizer(books_2d), "xyz_codebook": quantizer(books_3d), "vq_layers": len(books_2d)}
    torch.save(checkpoint, path)
    return path


def stride0(shape: tuple[int, ...]) -> torch.Tensor:
    """One float broadcast to ``shape`` (all strides 0): ``torch.save`` keeps 4 bytes of storage for it."""
    return torch.ones(1).expand(*shape)


def deflated(path: Path) -> None:
    """Re-write a ``torch.save`` zip archive with deflated entries (torch reads them; a zip bomb is made so)."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)


HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in to download</body></html>\n"
TEXT = b"version: 1\nthis file is a README someone saved as a .pth\n"
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 123456\n"
