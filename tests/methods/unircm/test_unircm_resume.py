"""Resumable Uni-RCM training: a run stopped after some epochs and started again ends where an uninterrupted
run ends (weights, Adam state, loss history), and a checkpoint of another training is never used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mmiad.methods.unircm import UniRCM
from mmiad.methods.unircm.resume import CHECKPOINT_NAME, TrainingCheckpoint


@pytest.fixture
def _train(train_tiny_mappings):
    """Fresh networks from the same seed, trained ``epochs`` epochs (3 steps of 2 images each)."""
    return lambda epochs, resume: train_tiny_mappings(epochs, resume, images=6, num_blocks=2)


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_a_stopped_run_continues_to_the_uninterrupted_result(_train, tmp_path: Path) -> None:
    reference, reference_history = _train(5, None)
    checkpoint = TrainingCheckpoint(tmp_path, "run-a")
    _, first = _train(2, checkpoint)  # "killed" after two epochs
    assert (tmp_path / CHECKPOINT_NAME).is_file() and first == reference_history[:2]
    resumed, history = _train(5, checkpoint)  # the same command again
    assert history == reference_history
    _assert_same(resumed, reference)  # weights and BatchNorm running statistics
    # Running it once more trains nothing and returns the same model.
    again, again_history = _train(5, checkpoint)
    assert again_history == reference_history
    _assert_same(again, reference)


def test_another_trainings_checkpoint_is_ignored_with_a_warning(_train, tmp_path: Path) -> None:
    reference, reference_history = _train(3, None)
    _train(2, TrainingCheckpoint(tmp_path, "run-a"))
    with pytest.warns(UserWarning, match="another training's state"):
        other, history = _train(3, TrainingCheckpoint(tmp_path, "run-b"))
    assert history == reference_history
    _assert_same(other, reference)


def test_a_damaged_checkpoint_is_reported_and_training_starts_over(_train, tmp_path: Path) -> None:
    reference, reference_history = _train(2, None)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"\x00" * 64)
    with pytest.warns(UserWarning, match="starting the training from epoch 0"):
        model, history = _train(2, TrainingCheckpoint(tmp_path, "run-a"))
    assert history == reference_history
    _assert_same(model, reference)


def test_a_tampered_checkpoint_restores_nothing(_train, tmp_path: Path) -> None:
    """Right fingerprint, wrong contents (a tensor of another shape): all or nothing, then a fresh start."""
    from mmiad.methods.modelfile import load_model_file, save_model_file

    reference, reference_history = _train(3, None)
    checkpoint = TrainingCheckpoint(tmp_path, "run-a")
    _train(1, checkpoint)
    tensors, header = load_model_file(checkpoint.path)
    name = next(n for n in tensors if n.startswith("opt.") and tensors[n].ndim == 2)
    tensors[name] = tensors[name][:, :-1].contiguous()  # Adam's moment no longer fits its parameter
    save_model_file(
        checkpoint.path, tensors, {k: v for k, v in header.items() if k not in ("format", "format_version")}
    )
    with pytest.warns(UserWarning, match="does not fit this training"):
        model, history = _train(3, checkpoint)
    assert history == reference_history
    _assert_same(model, reference)


def test_the_model_fingerprints_its_training_and_resumes_through_its_settings(
    tiny_dataset: Path, tiny_hparams: dict, tmp_path: Path
) -> None:
    from mmiad.data.mvtec3d import list_records

    records = list_records(tiny_dataset, "puck", "train")
    settings = {**tiny_hparams["unircm"], "use_orq": False, "cache_dir": str(tmp_path / "cache")}
    plain = UniRCM(**settings).fit(records)
    ticked = UniRCM(**settings, checkpoint_dir=str(tmp_path / "ck")).fit(records)
    assert ticked.loss_history_ == plain.loss_history_
    assert (tmp_path / "ck" / CHECKPOINT_NAME).is_file()
    resumed = UniRCM(**settings, checkpoint_dir=str(tmp_path / "ck")).fit(records)  # finished: nothing to train
    assert resumed.loss_history_ == plain.loss_history_
    _assert_same(resumed.map_to_3d_, plain.map_to_3d_)
    # Other data is another training: its fingerprint differs, so the checkpoint is not used.
    with pytest.warns(UserWarning, match="another training's state"):
        UniRCM(**settings, checkpoint_dir=str(tmp_path / "ck")).fit(records[:-1])
