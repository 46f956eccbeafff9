"""The one scoring loop: records in, labelled predictions out, for every command.

``test``, ``predict``, ``report``, ``compare``, threshold calibration (training and ``mmiad import``), ONNX
prediction, zero-shot scoring and :meth:`AnomalyModel.predict <mmiad.methods.base.AnomalyModel.predict>` all score
through :func:`score_records`, so a sample is treated the same whichever command reads it:

1. each record is read once (:func:`~mmiad.engine.reading.load_record`): its files, its preprocessed copy through
   the preprocessing cache, its features from the feature cache when present;
2. the feature-cache misses of ``batch_size`` records go through the extractors as one batch on the pipeline's
   device; on an accelerator the next batch is read on a worker thread meanwhile (read-ahead, as in ``fit``);
3. the method scores the features (:meth:`~mmiad.methods.base.AnomalyModel.score`), ``score_batch_size`` samples
   at a time, or all at once for a ``whole_batch`` method (MuSc's mutual scoring);
4. a sample with one modality missing (absent, unreadable or empty file) is scored by the single-modality
   fallback and flagged ``degraded`` with the file and the reason, unless ``strict`` (``--strict``,
   ``--require-both``) makes it an error;
5. a non-finite score or map is an error (it would compare false with every threshold, i.e. "good"), and the
   thresholds (the fallback's for a degraded sample) give the labels.

One bad sample costs that sample only: it is appended to ``errors`` (or raised when ``errors`` is None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.engine.reading import LoadedRecord, load_record
from mmiad.features.pipeline import DEFAULT_BATCH_SIZE, FeaturePipeline, SampleFeatures
from mmiad.methods.fallback import ModalityFallback
from mmiad.methods.modelfile import ModelFileError, one_line
from mmiad.methods.prediction import Prediction, Scored, check_finite
from mmiad.postprocess.threshold import Thresholds

#: Per-sample failures of a method or extractor that cost that sample only (an overflow, a degenerate cloud).
SAMPLE_FAILURES = (DataError, ArithmeticError, ValueError, RuntimeError, IndexError, MemoryError)


class Scorer(Protocol):
    """What the loop scores with: a fitted method, a zero-shot method or an ONNX export's scorer graph."""

    @property
    def name(self) -> str: ...

    @property
    def whole_batch(self) -> bool: ...

    @property
    def score_batch_size(self) -> int: ...

    @property
    def pipeline(self) -> FeaturePipeline: ...

    def prepare_scoring(self) -> None: ...

    def score(self, features: Sequence[SampleFeatures]) -> list[Scored]: ...


#: Called with each prediction before it is labelled: a whole sample's with its features (calibration scores the
#: fallbacks from them), a degraded one's with None and the reason its other modality is missing.
Observer = Callable[[Prediction, SampleFeatures | None, DataError | None], None]
#: A record to score: whole ones with their features and what the method derives from them (MuSc's tokens),
#: degraded ones with (None, None).
_Item = tuple[LoadedRecord, SampleFeatures | None, object]


def score_records(
    scorer: Scorer,
    records: Sequence[SampleRecord],
    *,
    thresholds: Thresholds | None = None,
    fallback: ModalityFallback | None = None,
    fallback_thresholds: Mapping[str, Thresholds] | None = None,
    key: str | None = None,
    strict: bool = False,
    label: bool = True,
    progress: bool = False,
    errors: list[DataError] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    observe: Observer | None = None,
    keep_rgb: bool = False,
) -> Iterator[Prediction]:
    """Predictions of ``records`` in input order (see the module docstring for what happens to each).

    Args:
        scorer: The method (fitted unless zero-shot) or ONNX scorer.
        records: The user's records; predictions name them (``record``), the preprocessed copy the features came
            from is kept as ``cached_record``.
        thresholds: Labels of whole samples (None: unlabelled).
        fallback: Single-modality models; without them a sample missing a modality is an error.
        fallback_thresholds: Labels of degraded samples, per present modality.
        key: Which model of a run this is (recorded on each prediction).
        strict: A sample missing a modality is an error, not a degraded prediction.
        label: Check finiteness and apply thresholds; False yields the method's raw predictions (``predict``).
        progress: Show a progress bar.
        errors: Where bad samples go; None raises the first.
        batch_size: Records per read and per extractor forward.
        observe: Called with each prediction before it is labelled (see :data:`Observer`).
        keep_rgb: Keep each user's RGB on its model input (``source_rgb``) for outputs at the original resolution,
            so that writing them decodes no file a second time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if getattr(scorer, "needs_training", False):
        scorer.check_fitted()  # type: ignore[attr-defined]
    scorer.prepare_scoring()
    pipeline = scorer.pipeline
    loop = _Loop(scorer, thresholds, fallback, dict(fallback_thresholds or {}), key, strict, label, errors, observe)
    chunks = [records[start : start + batch_size] for start in range(0, len(records), batch_size)]
    overlap = len(chunks) > 1 and pipeline.compute_device().type != "cpu"
    held: list[_Item] = []  # a whole-batch method scores everything at once, at the end
    with tqdm(total=len(records), desc=f"score {scorer.name}", disable=not progress, leave=False) as bar:
        for chunk, loaded in zip(chunks, _read_ahead(pipeline, chunks, overlap, keep_rgb), strict=True):
            items = loop.features(loaded)
            bar.update(len(chunk))
            if scorer.whole_batch:
                held.extend(items)
            else:
                yield from loop.finish(items)
        if held:
            yield from loop.finish(held)


def _load_chunk(
    pipeline: FeaturePipeline, chunk: Sequence[SampleRecord], keep_rgb: bool = False
) -> list[LoadedRecord | DataError]:
    """The host-side half: every record of a chunk read (or the error that stopped it)."""
    found: list[LoadedRecord | DataError] = []
    for record in chunk:
        try:
            found.append(load_record(pipeline, record, keep_rgb=keep_rgb))
        except DataError as error:
            found.append(error)
        except (OSError, ValueError, ArithmeticError, IndexError, MemoryError) as error:
            found.append(DataError(record.rgb_path, f"could not be read ({type(error).__name__}: {one_line(error)})"))
    return found


def _read_ahead(
    pipeline: FeaturePipeline, chunks: Sequence[Sequence[SampleRecord]], overlap: bool, keep_rgb: bool
) -> Iterator[list[LoadedRecord | DataError]]:
    """Each chunk read in order; with ``overlap`` the next chunk is read on a worker thread while the device
    computes the current one (on a CPU the thread would only compete with the extractors)."""
    if not overlap:
        for chunk in chunks:
            yield _load_chunk(pipeline, chunk, keep_rgb)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmiad-read") as reader:
        load = partial(_load_chunk, pipeline, keep_rgb=keep_rgb)
        upcoming: Future[list[LoadedRecord | DataError]] | None = reader.submit(load, chunks[0])
        for index in range(len(chunks)):
            assert upcoming is not None
            loaded = upcoming.result()
            following = index + 1
            upcoming = reader.submit(load, chunks[following]) if following < len(chunks) else None
            yield loaded


class _Loop:
    """The device half of :func:`score_records` and the labelling, with the settings of one call."""

    def __init__(
        self,
        scorer: Scorer,
        thresholds: Thresholds | None,
        fallback: ModalityFallback | None,
        fallback_thresholds: dict[str, Thresholds],
        key: str | None,
        strict: bool,
        label: bool,
        errors: list[DataError] | None,
        observe: Observer | None,
    ) -> None:
        self.scorer, self.pipeline = scorer, scorer.pipeline
        self.thresholds, self.fallback, self.fallback_thresholds = thresholds, fallback, fallback_thresholds
        self.key, self.strict, self.label, self.errors, self.observe = key, strict, label, errors, observe
        self.dropped: list[DataError] = []  # this pass's bad samples, named when a whole batch falls short

    def report(self, error: DataError) -> None:
        if self.errors is None:
            raise error
        self.dropped.append(error)
        self.errors.append(error)

    def features(self, loaded: Sequence[LoadedRecord | DataError]) -> list[_Item]:
        """Features of the chunk's whole samples (misses extracted in one batch); degraded ones pass as None."""
        items: list[LoadedRecord] = []
        whole: list[LoadedRecord] = []
        for entry in loaded:
            if isinstance(entry, DataError):
                self.report(entry)
            elif entry.missing is not None and not self._degraded_allowed(entry):
                continue
            else:
                items.append(entry)
                if entry.missing is None:
                    whole.append(entry)
        if not whole:
            return [(entry, None, None) for entry in items]
        computed = iter(self._extract(whole))
        derive = getattr(self.scorer, "prepare_features", None)
        ready: list[_Item] = []
        for entry in items:
            if entry.missing is not None:
                ready.append((entry, None, None))
                continue
            features = next(computed)
            try:
                if isinstance(features, BaseException):
                    raise features
                ready.append((entry, features, derive(features) if derive is not None else features))
            except ModelFileError:
                raise
            except SAMPLE_FAILURES as error:
                self.report(_sample_error(entry.source, error))
        return ready

    def _extract(self, whole: Sequence[LoadedRecord]) -> list[SampleFeatures | Exception]:
        """Features of whole samples: the cache misses in one batch through the extractors; when the batch fails
        (an extractor choking on one cloud), each sample alone, so that only the bad one is lost."""

        def batch(entries: Sequence[LoadedRecord]) -> list[SampleFeatures]:
            results: list[SampleFeatures | DataError | None] = [entry.features for entry in entries]
            pending = [
                (i, e.key, e.inputs) for i, e in enumerate(entries) if e.features is None and e.inputs is not None
            ]
            return self.pipeline._compute_batch((results, pending))  # type: ignore[return-value]

        try:
            return list(batch(whole))
        except SAMPLE_FAILURES as error:
            if len(whole) == 1:
                return [error]
        found: list[SampleFeatures | Exception] = []
        for entry in whole:
            try:
                found.extend(batch([entry]))
            except SAMPLE_FAILURES as error:
                found.append(error)
        return found

    def _degraded_allowed(self, entry: LoadedRecord) -> bool:
        """Whether a record missing a modality may be scored by the fallback; when not, it is reported."""
        assert entry.reason is not None
        if self.fallback is None:
            self.report(entry.reason)
            return False
        if self.strict:
            problem = f"{entry.reason.problem}; not scored from one modality (--strict / --require-both)"
            self.report(DataError(entry.reason.path, problem))
            return False
        return True

    def finish(self, items: Sequence[_Item]) -> Iterator[Prediction]:
        """Score a batch of items (whole ones through the method, degraded ones through the fallback) in order."""
        scored = iter(self._score([derived for _, features, derived in items if features is not None]))
        for entry, features, _ in items:
            try:
                if features is None:
                    prediction = self._degraded(entry)
                else:
                    result = next(scored)
                    if isinstance(result, Exception):
                        raise result
                    prediction = self._whole(entry, features, result)
                yield prediction
            except ModelFileError:
                raise
            except SAMPLE_FAILURES as error:
                self.report(_sample_error(entry.source, error))

    def _score(self, features: Sequence[object]) -> list[Scored | Exception]:
        """The method's results, ``score_batch_size`` at a time; a failing batch is retried sample by sample so
        that only the bad one is lost (a whole-batch method loses the batch: its scores need every sample)."""
        scorer = self.scorer
        size = max(1, len(features)) if scorer.whole_batch else max(1, scorer.score_batch_size)
        results: list[Scored | Exception] = []
        for start in range(0, len(features), size):
            batch = features[start : start + size]
            try:
                found: list[Scored | Exception] = list(scorer.score(batch))  # type: ignore[arg-type]
            except SAMPLE_FAILURES as error:
                if scorer.whole_batch:  # mutual scores need every sample: the batch fails as one
                    if isinstance(error, DataError) and self.dropped:  # say which files shrank the batch
                        names = ", ".join(str(dropped.path or dropped) for dropped in self.dropped)
                        read, total = len(features), len(features) + len(self.dropped)
                        problem = f"only {read} of {total} samples could be read ({error.problem}); unreadable: {names}"
                        raise type(error)(error.path, problem) from error
                    raise
                if len(batch) == 1:
                    found = [error]
                else:
                    found = []
                    for single in batch:
                        try:
                            found.extend(scorer.score([single]))  # type: ignore[list-item]
                        except SAMPLE_FAILURES as error_one:
                            found.append(error_one)
            if len(found) != len(batch):
                raise RuntimeError(f"{scorer.name}.score returned {len(found)} results for {len(batch)} samples")
            results.extend(found)
        return results

    def _whole(self, entry: LoadedRecord, features: SampleFeatures, result: Scored) -> Prediction:
        inputs = features.inputs
        prediction = Prediction(
            record=entry.source,
            pred_score=float(result.score),
            anomaly_map=np.asarray(result.anomaly_map, dtype=np.float32),
            label=inputs.label,
            gt_mask=inputs.gt_mask,
            geometry=inputs,
            modality_maps=dict(result.modality_maps),
            metric_maps=dict(result.metric_maps),
            model=self.key,
            cached_record=entry.prepared if entry.prepared != entry.source else None,
        )
        if self.observe is not None:
            self.observe(prediction, features, None)
        return self._labelled(prediction, self.thresholds)

    def _degraded(self, entry: LoadedRecord) -> Prediction:
        """The fallback's prediction from the one usable modality, flagged and explained."""
        assert self.fallback is not None and entry.inputs is not None and entry.reason is not None
        inputs, size = entry.inputs, self.pipeline.image_size
        if entry.missing == "3d":
            image = self.pipeline.image_features(inputs.rgb.unsqueeze(0))[0]
            anomaly_map, score = self.fallback.score_image(image, size)
        else:
            points = self.pipeline.point_features(inputs.xyz, inputs.valid)
            anomaly_map, score = self.fallback.score_points(points, size)
        present = "2d" if entry.missing == "3d" else "3d"
        prediction = Prediction(
            record=entry.source,
            pred_score=score,
            anomaly_map=anomaly_map.numpy(),
            label=inputs.label,
            gt_mask=inputs.gt_mask,
            geometry=inputs,
            modality_maps={f"{present}_only": anomaly_map.numpy()},
            degraded=True,
            model=self.key,
            modality=present,
            note=degraded_note(present, entry.reason),
        )
        if self.observe is not None:
            self.observe(prediction, None, entry.reason)
        thresholds = self.fallback_thresholds.get(present)
        if thresholds is None and self.label:
            prediction.note += f"; not labelled: the model has no {present}-only threshold"
        return self._labelled(prediction, thresholds)

    def _labelled(self, prediction: Prediction, thresholds: Thresholds | None) -> Prediction:
        if not self.label:
            return prediction
        check_finite(prediction)
        prediction.thresholds = thresholds
        if thresholds is not None:
            prediction.pred_label = int(prediction.pred_score > thresholds.image)
            prediction.pred_mask = prediction.anomaly_map > thresholds.pixel
        return prediction


def degraded_note(present: str, reason: DataError) -> str:
    """What ``predictions.csv``, the console and the test report say about a degraded sample: the file and why."""
    return f"degraded: scored from {present} only ({reason})"


def _sample_error(record: SampleRecord, error: BaseException) -> DataError:
    """A sample's failure as the DataError reported for it (a method's own DataError names the file already)."""
    if isinstance(error, DataError):
        return error
    return DataError(record.rgb_path, f"could not be scored ({type(error).__name__}: {one_line(error)})")
