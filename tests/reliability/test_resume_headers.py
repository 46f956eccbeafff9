"""Edited or forged Uni-RCM resume checkpoints: every one warns and the training starts over, ending exactly where
an uninterrupted run ends; none trains on the forged state and none raises (the CLI's exit 4 before this round)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from mmiad.methods.modelfile import load_model_file, save_model_file
from mmiad.methods.unircm import UniRCM
from mmiad.methods.unircm.blocks import RefGuidedMapping
from mmiad.methods.unircm.resume import TrainingCheckpoint, state_checksum

GRID, EPOCHS = 6, 3


@pytest.fixture(scope="session")
def _train(train_tiny_mappings):
    """The tiny training these tests resume: 4 samples, one block per mapping."""
    return lambda epochs, resume: train_tiny_mappings(epochs, resume, images=4, num_blocks=1)


@pytest.fixture(scope="module")
def reference(_train) -> tuple[nn.ModuleList, list[float]]:
    return _train(EPOCHS, None)


def _forge(path: Path, edit, *, reseal: bool = False) -> None:
    """Rewrite the checkpoint with ``edit(tensors, header)`` applied; ``reseal`` recomputes the checksum (an
    attacker who read the code), otherwise the old one stays (a careless edit)."""
    tensors, header = load_model_file(path)
    header = {k: v for k, v in header.items() if k not in ("format", "format_version", "mmiad_version")}
    edit(tensors, header)
    if reseal:
        header["checksum"] = state_checksum(tensors, header)
    save_model_file(path, tensors, header)


def _first(tensors: dict[str, torch.Tensor], prefix: str, ndim: int = 2) -> str:
    return next(n for n in sorted(tensors) if n.startswith(prefix) and tensors[n].ndim == ndim)


def _swap(tensors: dict[str, torch.Tensor], _: dict) -> None:
    shape = tensors[_first(tensors, "net.")].shape
    a, b = [n for n in sorted(tensors) if n.startswith("net.") and tensors[n].shape == shape][:2]
    tensors[a], tensors[b] = tensors[b], tensors[a]


def _set(key: str, value: Any):
    def edit(_: dict, header: dict) -> None:
        header[key] = value

    return edit


def _group(key: str, value: Any):
    def edit(_: dict, header: dict) -> None:
        header["param_groups"][0][key] = value

    return edit


def _tensor(how: str):
    def edit(tensors: dict[str, torch.Tensor], _: dict) -> None:
        if how == "random":
            name = _first(tensors, "net.")
            tensors[name] = torch.randn_like(tensors[name])
        elif how == "int32":
            name = _first(tensors, "net.")
            tensors[name] = tensors[name].to(torch.int32)
        elif how == "negative_step":
            tensors[_first(tensors, "opt.", 0)] = torch.tensor(-4.0)
        elif how == "negative_moment":
            name = next(n for n in sorted(tensors) if n.endswith("exp_avg_sq"))
            tensors[name] = -tensors[name] - 1
        elif how == "nan":
            name = _first(tensors, "net.")
            tensors[name] = tensors[name].clone().fill_(float("nan"))
        elif how == "extra":
            tensors["net.injected"] = torch.zeros(3)
        elif how == "generator":
            tensors["generator"] = tensors["generator"][:-1].contiguous()

    return edit


FORGERIES = {
    "lr -1": _group("lr", -1.0),
    "lr 1e6": _group("lr", 1e6),
    "bad betas": _group("betas", [0.9, 1.5]),
    "weight decay": _group("weight_decay", 0.5),
    "epoch 99": _set("epoch", 99),
    "epoch -5": _set("epoch", -5),
    "epoch as text": _set("epoch", "1"),
    "epoch true": _set("epoch", True),
    "history too long": _set("history", [1.0, 2.0, 3.0]),
    "history of text": _set("history", ["a"]),
    "param_groups gone": _set("param_groups", None),
    "swapped tensors": _swap,
    "random tensor": _tensor("random"),
    "int32 tensor": _tensor("int32"),
    "negative step": _tensor("negative_step"),
    "negative second moment": _tensor("negative_moment"),
    "nan tensor": _tensor("nan"),
    "extra tensor": _tensor("extra"),
    "short generator": _tensor("generator"),
    "checksum removed": _set("checksum", None),
}


@pytest.fixture(scope="module")
def saved(_train, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a genuine checkpoint after one of three epochs."""
    checkpoint = TrainingCheckpoint(tmp_path_factory.mktemp("resume"), "run-a")
    _train(1, checkpoint)
    return checkpoint.path.read_bytes()


def _restore(folder: Path, saved: bytes, edit=None, *, reseal: bool = False):
    """(restore's answer, networks before, networks after) for the checkpoint ``saved`` after ``edit``, restored
    into fresh objects built as :func:`train_mappings` builds them."""
    checkpoint = TrainingCheckpoint(folder, "run-a")
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.path.write_bytes(saved)
    if edit is not None:
        _forge(checkpoint.path, edit, reseal=reseal)
    torch.manual_seed(1)
    shape = {"hidden": 8, "grid": GRID, "num_blocks": 1}
    networks = nn.ModuleList([RefGuidedMapping(5, 4, **shape), RefGuidedMapping(4, 5, **shape)])
    before = {k: v.clone() for k, v in networks.state_dict().items()}
    optimizer = torch.optim.Adam(networks.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    answer = checkpoint.restore(networks, optimizer, generator, epochs=EPOCHS)
    return answer, before, networks.state_dict(), optimizer


@pytest.mark.parametrize("reseal", [False, True], ids=["careless", "resealed"])
@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_checkpoint_warns_and_restores_nothing(tmp_path: Path, saved: bytes, forgery: str, reseal: bool):
    if reseal and forgery in ("swapped tensors", "random tensor", "checksum removed"):
        pytest.skip("only the checksum tells these from a genuine state: resealing makes them genuine")
    with pytest.warns(UserWarning, match="starting the training from epoch 0"):
        answer, before, after, optimizer = _restore(tmp_path, saved, FORGERIES[forgery], reseal=reseal)
    assert answer is None and not optimizer.state
    assert all(torch.equal(before[name], after[name]) for name in before)  # nothing half-loaded


def test_a_genuine_checkpoint_still_restores_without_a_warning(tmp_path: Path, saved: bytes, recwarn) -> None:
    answer, before, after, optimizer = _restore(tmp_path, saved)
    assert answer is not None and answer[0] == 1 and len(answer[1]) == 1
    assert optimizer.state and not all(torch.equal(before[name], after[name]) for name in before)
    assert not [w for w in recwarn if "epoch 0" in str(w.message)]


@pytest.mark.parametrize("forgery", ["lr 1e6", "epoch 99"])
def test_training_over_a_forged_checkpoint_ends_as_an_uninterrupted_run(
    _train, tmp_path: Path, reference, forgery: str
):
    """Before this round lr 1e6 exited 4 and epoch 99 stopped after one of three epochs."""
    checkpoint = TrainingCheckpoint(tmp_path, "run-a")
    _train(1, checkpoint)
    _forge(checkpoint.path, FORGERIES[forgery], reseal=True)
    with pytest.warns(UserWarning, match="does not fit this training"):
        networks, history = _train(EPOCHS, checkpoint)
    assert history == reference[1]
    for (name, value), (_, expected) in zip(
        networks.state_dict().items(), reference[0].state_dict().items(), strict=True
    ):
        assert torch.equal(value, expected), name


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(epoch=st.one_of(st.integers(-1000, -1), st.integers(EPOCHS + 1, 10**6)))
def test_any_epoch_outside_the_run_is_refused(tmp_path: Path, saved: bytes, epoch: int) -> None:
    with pytest.warns(UserWarning, match=r"epoch .* is outside \[0, 3\]"):
        answer, *_ = _restore(tmp_path / f"e{epoch}", saved, _set("epoch", epoch), reseal=True)
    assert answer is None


def test_an_empty_checkpoint_dir_is_refused() -> None:
    """``checkpoint_dir=""`` would be Path("."): the state would land wherever the command runs."""
    with pytest.raises(ValueError, match=r"checkpoint_dir=.* names no folder"):
        UniRCM(checkpoint_dir="")
