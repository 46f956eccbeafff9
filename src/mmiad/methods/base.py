"""What every method shares: the prediction record and the estimator contract (with persistence).

Methods follow scikit-learn's estimator contract: ``__init__`` only stores hyperparameters, ``fit(records)``
learns from nominal samples and returns ``self``, learned state ends with an underscore, and ``predict`` refuses
to run before ``fit``. Every registered method is exercised by one shared conformance test.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.methods.modelfile import ModelFileError
from mmiad.methods.prediction import Prediction, Scored, check_finite, finite_only, with_source
from mmiad.methods.settings import MethodSettings
from mmiad.utils.compute import device_present, resolve_device

__all__ = ["AnomalyModel", "NotFittedError", "Prediction", "Scored", "check_finite", "finite_only", "with_source"]

if TYPE_CHECKING:
    from mmiad.features.pipeline import FeaturePipeline, SampleFeatures


class NotFittedError(RuntimeError):
    """``predict`` or ``save`` was called before ``fit``."""


class AnomalyModel(ABC):
    """Base class of every method.

    A method declares its settings class (``config_class``), learns in :meth:`fit`, scores in :meth:`predict`, and
    for persistence provides only its learned tensors (:meth:`state_tensors`), the facts it wants in the model
    file (:meth:`learned_facts`) and how to restore both (:meth:`load_state`). Saving the config, checking the
    pipeline and the fitted flag live here, once.

    Class attributes:
        name: Registry name (set by :func:`~mmiad.methods.registry.register_method`).
        config_class: The method's settings dataclass.
        tiny_hparams: Settings for a seconds-long fit on the ``tiny`` synthetic preset (the shared conformance
            tests run every registered method with them).
        needs_training: False for zero-shot methods, which score a batch without ``fit``.
        training_free: True when ``fit`` only stores the nominal samples, nothing is optimised (RAD): then
            ``mmiad test --method M --data D`` builds that memory from the training split and tests in one command.
        modalities: What the method reads: ``("2d", "3d")``, ``("3d",)`` or ``("2d",)``.
        unified: True when one model serves every category by design (Uni-RCM, GLFM).
        few_shot: True when the method is meant for a handful of nominal samples (CIF, RAD).
        whole_batch: True when :meth:`score` must see every test sample at once (MuSc's mutual scoring);
            otherwise the engine hands it ``score_batch_size`` samples at a time.
        importable: True when ``mmiad import`` can read the official release's checkpoints for it.
        compat_protocol: True when ``compat`` also switches the metrics to the official evaluation protocol.

    Capabilities are declared here, once, on the class; the engine, the CLI and the benchmarks read them from the
    registry and never list method names themselves. ONNX export is declared by overriding :meth:`export_scorer`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodSettings]] = MethodSettings
    tiny_hparams: ClassVar[dict[str, Any]] = {}
    needs_training: ClassVar[bool] = True
    training_free: ClassVar[bool] = False
    modalities: ClassVar[tuple[str, ...]] = ("2d", "3d")
    unified: ClassVar[bool] = False
    few_shot: ClassVar[bool] = False
    whole_batch: ClassVar[bool] = False
    importable: ClassVar[bool] = False
    compat_protocol: ClassVar[bool] = False
    score_batch_size: ClassVar[int] = 8
    config: Any
    fitted_: bool  # set by fit() and from_state(); absent before (scikit-learn's convention)
    _pipeline: FeaturePipeline | None = None

    def __init__(self, config: MethodSettings | None = None, *, cache_dir: str | None = None, **hparams: Any) -> None:
        if config is not None and hparams:
            raise TypeError("pass either a config object or keyword hyperparameters, not both")
        self.config = config if config is not None else self.config_class(**hparams)
        self.cache_dir = cache_dir
        self._pipeline = None

    @property
    def settings(self) -> Any:
        """The settings in effect: the config with ``compat`` resolved (the config itself is what the user set)."""
        return self.config.resolved()

    @abstractmethod
    def fit(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> AnomalyModel:
        """Learn from nominal samples; bad samples are appended to ``errors`` and skipped."""

    @abstractmethod
    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]:
        """Score a batch of samples from their features, in order: the one thing a method does at test time.

        The engine reads, preprocesses and extracts (batched, cached, on the device); the method never opens a
        file here. ``features[i].inputs`` gives the resized model input when a method needs it (masks, xyz).
        A method that cannot score one sample raises :class:`~mmiad.data.errors.DataError` naming it; the
        engine then scores the rest of the batch one by one, so one bad sample costs only itself.
        """

    def prepare_features(self, features: SampleFeatures) -> Any:
        """What :meth:`score` receives for one sample: the pipeline's features (the default), or a per-sample
        representation the method derives from them without reading files (MuSc's tokens). The engine calls it
        sample by sample, so a sample the method cannot use (a DataError here) costs only itself, even for a
        ``whole_batch`` method."""
        return features

    def prepare_scoring(self) -> None:  # noqa: B027 (a hook: most methods need nothing)
        """Called once before a :meth:`predict` pass (put networks in eval mode, move banks to the device)."""

    def predict(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> Iterator[Prediction]:
        """Predictions in order, unlabelled: the engine's scoring loop (:func:`mmiad.engine.scoring.score_records`)
        reads and extracts in batches and hands the features to :meth:`score`.

        Zero-shot methods (``needs_training`` False) need no ``fit``; ``whole_batch`` methods see every sample
        at once. A bad sample is appended to ``errors`` (or raised) and skipped. Without a fallback, a sample
        missing a modality is such a bad sample; the engine's trained models score it degraded.
        """
        from mmiad.engine.scoring import score_records  # the engine builds on methods, not the reverse

        return score_records(self, records, label=False, progress=progress, errors=errors)

    # ------------------------------------------------------------------ persistence
    def get_config(self) -> dict[str, Any]:
        """Hyperparameters as the user set them, and once fitted the pipeline and the method's learned facts."""
        config: dict[str, Any] = {"method": self.name, "hparams": asdict(self.config)}
        if getattr(self, "fitted_", False):
            config["pipeline"] = self.pipeline.config()
            config.update(self.learned_facts())
        return config

    def learned_facts(self) -> dict[str, Any]:
        """JSON-serialisable facts learned by ``fit`` that :meth:`load_state` needs back (channels, sizes...)."""
        return {}

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors to store in the model file."""

    @abstractmethod
    def load_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` and :meth:`learned_facts` saved (``config`` is the whole header).

        Raises:
            ModelFileError: when a tensor or fact is missing or does not fit.
        """

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **overrides: Any) -> AnomalyModel:
        """Rebuild a fitted model from :meth:`get_config` and :meth:`state_tensors`.

        ``overrides`` replaces inference-time hyperparameters (``cache_dir`` is not one: it says where caches go).
        A stored ``device`` this machine does not have is replaced by ``auto``.

        Raises:
            ModelFileError: for missing or invalid hyperparameters, another pipeline than the one configured now,
                or learned state that does not fit the method.
        """
        stored = config.get("hparams")
        if not isinstance(stored, dict):
            raise ModelFileError(f"the {cls.name} model file has no 'hparams' object")
        hparams = {**cls.upgrade_hparams(stored), **{k: v for k, v in overrides.items() if k != "cache_dir"}}
        # The device a model was trained on is history, not a requirement: one that is not here becomes ``auto``
        # (CUDA when present, else the CPU), so a model trained on a GPU predicts on a laptop.
        if "device" not in overrides and not device_present(str(hparams.get("device", "auto"))):
            hparams["device"] = "auto"
        try:
            settings = cls.config_class(**hparams)
        except (TypeError, ValueError) as error:
            raise ModelFileError(f"invalid {cls.name} hyperparameters in the model file: {error}") from error
        model = cls(settings, cache_dir=overrides.get("cache_dir"))
        model.check_pipeline(config.get("pipeline"))
        try:
            model.load_state(config, tensors)
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise ModelFileError(f"the {cls.name} model file's learned state does not fit: {error!r}") from error
        model.fitted_ = True
        return model

    # ------------------------------------------------------------------ hooks
    @classmethod
    def upgrade_hparams(cls, stored: dict[str, Any]) -> dict[str, Any]:
        """Hyperparameters of a model file written by an older mmiad, completed so the model scores as it did when
        it was trained and calibrated (a new option's default may differ from the behaviour it replaced)."""
        return dict(stored)

    def fit_shared(
        self,
        records_by_category: Mapping[str, Sequence[SampleRecord]],
        *,
        progress: bool = False,
        errors: list[DataError] | None = None,
    ) -> Any:
        """Train, once, what the per-category models of one run share (M3DM's UFF, trained on all categories as
        the official code does); the engine hands the result to each category's :meth:`use_shared` before
        :meth:`fit`. None (the default) means nothing is shared."""
        return None

    def use_shared(self, shared: Any) -> None:  # noqa: B027 (a hook: most methods share nothing)
        """Receive :meth:`fit_shared`'s result before :meth:`fit` (ignored by methods that share nothing)."""

    def export_scorer(self, out_dir: Any) -> dict[str, Any]:
        """Write ``scorer.onnx`` for ``mmiad export`` and describe it; methods that cannot be exported refuse.

        Raises:
            ValueError: for methods without an ONNX scorer (memory banks search millions of rows).
        """
        raise ValueError(f"ONNX export is not available for method {self.name!r}")

    @property
    def device(self) -> torch.device:
        """Where the method's networks, banks and scoring run: ``config.device`` resolved (``auto``: CUDA when
        present; under torchrun with NCCL, the rank's own GPU)."""
        return resolve_device(self.config.device)

    def preprocess_profile(self) -> str:
        """The offline preprocessing profile of this method's settings."""
        return str(self.config.profile)

    @property
    def pipeline(self) -> FeaturePipeline:
        """The feature pipeline, built on first use (building deep extractors loads their weights).

        Every method reads the same :class:`~mmiad.methods.settings.MethodSettings` fields for it and shares one
        feature cache under ``cache_dir``.
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
                point_options=config.point_options,
                device=config.device,
                precision=config.precision,
            )
        assert self._pipeline is not None
        return self._pipeline

    def check_pipeline(self, trained_with: dict[str, Any] | None) -> None:
        """Refuse to load a model whose features would now come from other extractors or preprocessing.

        Raises:
            ModelFileError: naming both configurations (e.g. another weights file or extractor preset).
        """
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
