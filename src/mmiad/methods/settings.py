"""The settings every method reads for its feature pipeline, and how ``compat`` is resolved without rewriting them.

A method's config is a dataclass inheriting :class:`MethodSettings`. The config holds exactly what the user set:
it is saved as given and loads back unchanged. Where the official code's behaviour differs from the paper's
default, the method lists the official values in :meth:`MethodSettings.compat_values`; :meth:`resolved` returns
the settings in effect (a copy) and the model reads those, so ``compat`` never overwrites a field the user chose.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from mmiad.methods.hparams import require
from mmiad.utils.compute import check_device_name, check_precision

SettingsT = TypeVar("SettingsT", bound="MethodSettings")


@dataclass
class MethodSettings:
    """Pipeline settings shared by every method.

    Attributes:
        extractors: Extractor preset or ``IMAGE+POINT`` pair (see :mod:`mmiad.features.registry`).
        image_size: Model input side (224 in every paper).
        weights_dir: Folder with pretrained checkpoints (deep extractors).
        random_init: Allow random extractor weights (tests, smoke runs, speed benchmarks).
        profile: Offline preprocessing profile (``cfm``, ``m3dm`` or ``none``).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. Where the model runs, not what
            it computes: a model trained on a GPU loads and predicts on a CPU (see :mod:`mmiad.utils.compute`).
        precision: ``fp32`` (the papers'), ``bf16`` or ``fp16``: autocast for the extractors and the learned
            networks. It changes the features, so it is part of the pipeline's config (and the cache key).
        compat: The official code's behaviour where it differs from the paper.
        point_options: Options of the 3D extractor (e.g. ``{"batchnorm": "running"}`` for Point-MAE's eval-mode
            statistics, ``{"nonzero": "any"}`` for the any-coordinate point rule); None keeps the official defaults.

    Class attributes:
        inference_keys: The fields that still apply to a trained model: ``mmiad test``/``predict --run R --set``
            accept these (and record them) and refuse every other field, which only training can change. A
            subclass adds its scoring-time fields (``inference_keys = MethodSettings.inference_keys | {...}``).
        paper_extractors: The extractor preset of the method's published numbers (the benchmarks' "deep" preset).
    """

    inference_keys: ClassVar[frozenset[str]] = frozenset({"device", "compat", "weights_dir"})
    paper_extractors: ClassVar[str] = "dino-pointmae"

    extractors: str = "weightfree"
    image_size: int = 224
    weights_dir: str | None = None
    random_init: bool = False
    profile: str = "cfm"
    device: str = "auto"
    precision: str = "fp32"
    compat: bool = False
    point_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """Check the shared fields' spelling (subclasses call this first from their own ``__post_init__``)."""
        self.device = check_device_name(self.device)
        check_precision(self.precision)
        require(self.image_size >= 1, "image_size", self.image_size, "must be at least 1")

    def compat_values(self) -> dict[str, Any]:
        """Field → the official code's value, applied by :meth:`resolved` under ``compat`` to fields left at their
        default. The base has none."""
        return {}

    def resolved(self: SettingsT) -> SettingsT:
        """The settings in effect: a copy with ``compat``'s official values filled in where the user kept the
        default. ``self`` is never changed."""
        if not self.compat:
            return self
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changes = {k: v for k, v in self.compat_values().items() if getattr(self, k) == defaults.get(k)}
        return dataclasses.replace(self, **changes) if changes else self
