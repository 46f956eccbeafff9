"""What every method shares: the prediction record, the estimator contract and the method registry.

Methods follow scikit-learn's estimator contract: ``__init__`` only stores hyperparameters, ``fit(records)``
learns from nominal samples and returns ``self``, learned state ends with an underscore, and ``predict`` refuses
to run before ``fit``. Every registered method is exercised by one shared conformance test.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord

if TYPE_CHECKING:
    from mmiad.features.pipeline import FeaturePipeline


@dataclass
class Prediction:
    """The output for one sample, at the model's square input resolution.

    Attributes:
        record: The sample it belongs to.
        pred_score: Image-level anomaly score (higher is more anomalous).
        anomaly_map: S×S final anomaly map.
        label: Ground-truth label (-1 when unknown).
        gt_mask: S×S ground truth resized like the model input, or None.
        geometry: How the square input maps back to the original image (see ``map_to_original``).
        modality_maps: Intermediate maps by name (e.g. ``2d``, ``3d``), for reports.
        metric_maps: Per-metric maps where the official code normalises differently per metric (``compat``).
        pred_label: 1 when ``pred_score`` exceeds the calibrated threshold, else 0 (None without thresholds).
        pred_mask: S×S bool mask of pixels above the calibrated pixel threshold (None without thresholds).
        degraded: True when a modality was missing and the score comes from a fallback.
    """

    record: SampleRecord
    pred_score: float
    anomaly_map: np.ndarray
    label: int
    gt_mask: np.ndarray | None
    geometry: Any
    modality_maps: dict[str, np.ndarray] = field(default_factory=dict)
    metric_maps: dict[str, np.ndarray] = field(default_factory=dict)
    pred_label: int | None = None
    pred_mask: np.ndarray | None = None
    degraded: bool = False

    def map_for(self, metric: str) -> np.ndarray:
        """The map a metric should read: its own in ``compat`` runs, otherwise the final map."""
        return self.metric_maps.get(metric, self.anomaly_map)


class NotFittedError(RuntimeError):
    """``predict`` or ``save`` was called before ``fit``."""


class AnomalyModel(ABC):
    """Base class of every method (CFM, Uni-RCM, M3DM, BTF)."""

    name: ClassVar[str]
    config: Any
    _pipeline: FeaturePipeline | None = None

    @abstractmethod
    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> AnomalyModel:
        """Learn from nominal samples; bad samples are appended to ``errors`` and skipped."""

    @abstractmethod
    def predict(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> Iterator[Prediction]:
        """Predictions one sample at a time (so a large test set never has to fit in memory)."""

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """Hyperparameters and everything needed to rebuild the model (JSON-serialisable)."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors to store in the model file."""

    @classmethod
    @abstractmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **overrides: Any) -> AnomalyModel:
        """Rebuild a fitted model from :meth:`get_config` and :meth:`state_tensors`."""

    def preprocess_profile(self) -> str:
        """The offline preprocessing profile: the config's ``profile`` if it has one, else ``cfm``."""
        return str(getattr(self.config, "profile", "cfm"))

    @property
    def pipeline(self) -> FeaturePipeline:
        """The feature pipeline, built on first use (building deep extractors loads their weights).

        Every method reads the same config fields for it (``extractors``, ``image_size``, ``weights_dir``,
        ``random_init``) and shares one feature cache under ``cache_dir``.
        """
        if getattr(self, "_pipeline", None) is None:
            from mmiad.features.registry import build_pipeline

            config = self.config
            self._pipeline = build_pipeline(
                config.extractors,
                profile=self.preprocess_profile(),
                image_size=config.image_size,
                weights_dir=config.weights_dir,
                random_init=config.random_init,
                cache_dir=getattr(self, "cache_dir", None),
            )
        return self._pipeline

    def check_pipeline(self, trained_with: dict[str, Any] | None) -> None:
        """Refuse to load a model whose features would now come from other extractors or preprocessing.

        Raises:
            ModelFileError: naming both configurations (e.g. another weights file or extractor preset).
        """
        from mmiad.methods.modelfile import ModelFileError

        # Compare JSON forms: the stored config went through JSON (tuples became lists).
        now = json.loads(json.dumps(self.pipeline.config()))
        if trained_with is not None and trained_with != now:
            raise ModelFileError(
                "this model was trained with other extractors or preprocessing than the ones configured now:\n"
                f"  trained with: {trained_with}\n  now:          {now}\n"
                "use the same --extractors preset and weights files as for training"
            )

    def check_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless ``fit`` has run."""
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit() first")


ModelT = TypeVar("ModelT", bound=type[AnomalyModel])
_REGISTRY: dict[str, type[AnomalyModel]] = {}


def register_method(name: str) -> Callable[[ModelT], ModelT]:
    """Class decorator adding a method to the registry under ``name`` (what ``--method`` takes)."""

    def decorate(cls: ModelT) -> ModelT:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """Names accepted by ``--method``."""
    _import_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[AnomalyModel]:
    """The class registered under ``name``, with a clear error listing the known names."""
    _import_builtin_methods()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _import_builtin_methods() -> None:
    import mmiad.methods.btf
    import mmiad.methods.cfm
    import mmiad.methods.m3dm
    import mmiad.methods.unircm  # noqa: F401
