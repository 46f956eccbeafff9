"""Resumable Uni-RCM training: the whole training state after every epoch, so a killed run continues.

Why: the paper's settings take a day or more on a CPU (BENCHMARKS.md, "Training memory"); a run killed at
hour 20 (a reboot, the out-of-memory killer, a session limit) must not start again from epoch 0. With
``checkpoint_dir`` set, the state after each epoch goes to one file there (written atomically: a kill during the
write leaves the previous epoch's file); running the same command again restores it and continues with the next
epoch, and the result equals an uninterrupted run's (tested: weights, Adam's moments, the shuffling generator and
the loss history are all restored).

The file is a safetensors file with a JSON header like a model file (never a pickle). It carries a fingerprint
of what the training depends on (the settings that change the result, the training samples, the grids'
widths and the features' mean squares); a file from another training is ignored with a warning and overwritten.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmiad.methods.modelfile import ModelFileError, load_model_file, save_model_file

CHECKPOINT_NAME = "unircm-training.safetensors"
KIND = "unircm-training-checkpoint"
#: Settings that do not change the trained weights (where, and how the memory is split), so a resumed run may
#: change them; every other setting enters the fingerprint.
NEUTRAL_SETTINGS = frozenset(
    {"checkpoint_dir", "device", "memory_budget_gb", "micro_batch", "activation_checkpointing"}
)


def training_fingerprint(settings: Any, kept: list[int], widths: tuple[int, int], mean_squares: Any) -> str:
    """SHA-256 of what a training run depends on (see the module docstring); ``settings`` is the config."""
    relevant = {k: v for k, v in sorted(asdict(settings).items()) if k not in NEUTRAL_SETTINGS}
    described = {"settings": relevant, "samples": kept, "widths": list(widths), "mean_squares": list(mean_squares)}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class TrainingCheckpoint:
    """Where one training run keeps its state, and the fingerprint that state must carry.

    Attributes:
        directory: The folder (created on the first save).
        fingerprint: :func:`training_fingerprint` of this run.
    """

    directory: Path
    fingerprint: str

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return Path(self.directory) / CHECKPOINT_NAME

    def save(
        self,
        epoch: int,
        networks: nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        history: list[float],
    ) -> None:
        """Write the state after ``epoch`` completed epochs (atomically)."""
        tensors = {f"net.{name}": value for name, value in networks.state_dict().items()}
        state = optimizer.state_dict()
        for index, slots in state["state"].items():
            for name, value in slots.items():
                tensors[f"opt.{index}.{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        tensors["generator"] = generator.get_state()
        header = {
            "kind": KIND,
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "history": history,
            "param_groups": state["param_groups"],
        }
        save_model_file(self.path, tensors, header)

    def restore(
        self, networks: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> tuple[int, list[float]] | None:
        """Load the saved state into the objects and return (completed epochs, loss history), or None when there
        is no usable checkpoint (none yet, another training's, or an unreadable file: each warns but the last
        two, and training starts from epoch 0)."""
        if not self.path.is_file():
            return None
        try:
            tensors, header = load_model_file(self.path)
        except ModelFileError as error:
            warnings.warn(f"{error}; starting the training from epoch 0", stacklevel=2)
            return None
        if header.get("kind") != KIND or header.get("fingerprint") != self.fingerprint:
            warnings.warn(
                f"{self.path} holds another training's state (other settings or data); starting from epoch 0 "
                "and overwriting it",
                stacklevel=2,
            )
            return None
        # Fingerprinted but edited or damaged inside: load all or nothing, so a half-restored state never trains.
        before = (copy.deepcopy(networks.state_dict()), copy.deepcopy(optimizer.state_dict()), generator.get_state())
        try:
            networks.load_state_dict({name[4:]: value for name, value in tensors.items() if name.startswith("net.")})
            slots: dict[int, dict[str, torch.Tensor]] = {}
            for name, value in tensors.items():
                if name.startswith("opt."):
                    _, index, slot = name.split(".", 2)
                    slots.setdefault(int(index), {})[slot] = value
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            for position, named in slots.items():  # the optimizer itself would only fail at its next step
                for slot_name, value in named.items():
                    if value.ndim and value.shape != parameters[position].shape:
                        raise ValueError(f"optimizer slot {position}.{slot_name} of shape {tuple(value.shape)}")
            optimizer.load_state_dict({"state": slots, "param_groups": header["param_groups"]})
            generator.set_state(tensors["generator"])
            return int(header["epoch"]), [float(v) for v in header["history"]]
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            networks.load_state_dict(before[0])
            optimizer.load_state_dict(before[1])
            generator.set_state(before[2])
            warnings.warn(
                f"{self.path}: the saved state does not fit this training ({type(error).__name__}); "
                "starting the training from epoch 0",
                stacklevel=2,
            )
            return None
