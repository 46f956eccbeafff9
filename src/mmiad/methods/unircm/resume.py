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

Nothing else in the file is trusted either (:func:`state_problem`): the completed epochs must lie in
``[0, epochs]`` with one loss per epoch, the optimizer's hyperparameters must equal the run's, every tensor
name, shape and dtype must equal what the networks, Adam and the generator hold, the values must be finite
(Adam's second moments non-negative, its step a non-negative whole number), and a SHA-256 over the tensors and
those header fields must match. An edited learning rate, a swapped, random or re-typed tensor, an epoch of 99
or -5: each warns and the training starts over, as a wrong fingerprint does, instead of training on it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Mapping
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


def state_checksum(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and the header fields a resume trusts."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    fields = {key: header.get(key) for key in ("epoch", "history", "param_groups")}
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _expected_slots(optimizer: torch.optim.Optimizer) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Every ``opt.<i>.<slot>`` tensor a saved Adam holds after a step: name -> (shape, dtype; None: any float).

    ``amsgrad`` (a fourth slot) is never used by the training, so its slot would be a forged one."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for index, parameter in enumerate(parameters):
        expected[f"opt.{index}.step"] = ((), None)
        for slot in ("exp_avg", "exp_avg_sq"):
            expected[f"opt.{index}.{slot}"] = (tuple(parameter.shape), parameter.dtype)
    return expected


def state_problem(
    tensors: Mapping[str, torch.Tensor],
    header: Mapping[str, Any],
    *,
    networks: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epochs: int | None,
) -> str | None:
    """What makes a fingerprinted checkpoint unusable for this training, or None when it can be restored.

    See the module docstring for the rules; ``epochs`` is the run's number of epochs (None: not checked).
    """
    epoch = header.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 or (epochs is not None and epoch > epochs):
        return f"epoch {epoch!r} is outside [0, {epochs}]"
    history = header.get("history")
    if not isinstance(history, list) or len(history) != epoch:
        return f"a loss history of {len(history) if isinstance(history, list) else history!r} entries for {epoch}"
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in history):
        return "a loss history that is not numbers"
    own_groups = json.loads(json.dumps(optimizer.state_dict()["param_groups"]))
    if header.get("param_groups") != own_groups:
        return "optimizer hyperparameters (learning rate, betas, ...) that differ from this run's"
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {
        f"net.{name}": (tuple(value.shape), value.dtype) for name, value in networks.state_dict().items()
    }
    expected["generator"] = (tuple(generator.get_state().shape), torch.uint8)
    # Adam keeps slots only for parameters that received a gradient (none before the first step), but a
    # parameter it keeps has all three.
    slots = _expected_slots(optimizer)
    present = {name.rsplit(".", 1)[0] for name in tensors if name in slots}
    expected.update({name: spec for name, spec in slots.items() if name.rsplit(".", 1)[0] in present})
    if set(tensors) != set(expected):
        odd = sorted(set(tensors) ^ set(expected))
        return f"other tensors than this training's ({', '.join(odd[:3])}{' …' if len(odd) > 3 else ''})"
    for name, (shape, dtype) in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
            return f"{name} of shape {tuple(tensor.shape)} and dtype {tensor.dtype}"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"NaN or infinite values in {name}"
        if name.endswith(".exp_avg_sq") and bool((tensor < 0).any()):
            return f"negative second moments in {name}"
        if name.endswith(".step"):
            step = float(tensor)
            if not tensor.is_floating_point() or step < 0 or not math.isfinite(step) or step != int(step):
                return f"Adam step {step!r} in {name}"
    steps = {float(tensors[name]) for name in slots if name.endswith(".step") and name in tensors}
    if len(steps) > 1:
        return "Adam steps that differ between parameters"
    if header.get("checksum") != state_checksum(tensors, header):
        return "a checksum that does not match its contents (edited or damaged)"
    return None


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
        header: dict[str, Any] = {
            "kind": KIND,
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "history": history,
            "param_groups": state["param_groups"],
        }
        header["checksum"] = state_checksum(tensors, json.loads(json.dumps(header)))
        save_model_file(self.path, tensors, header)

    def restore(
        self,
        networks: nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        *,
        epochs: int | None = None,
    ) -> tuple[int, list[float]] | None:
        """Load the saved state into the objects and return (completed epochs, loss history), or None when there
        is no usable checkpoint (none yet, another training's, an unreadable file, or one that fails
        :func:`state_problem` for a run of ``epochs`` epochs: each warns but the first, and training starts from
        epoch 0)."""
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
        problem = state_problem(
            tensors, header, networks=networks, optimizer=optimizer, generator=generator, epochs=epochs
        )
        if problem is not None:
            warnings.warn(
                f"{self.path}: the saved state does not fit this training ({problem}); starting the training from "
                "epoch 0 and overwriting it",
                stacklevel=2,
            )
            return None
        # Checked, but a load may still fail: all or nothing, so a half-restored state never trains.
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
