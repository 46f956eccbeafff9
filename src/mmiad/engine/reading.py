"""Reading one record for scoring, once: its files, its preprocessed copy, its cached features or model input.

The scoring loop (:mod:`mmiad.engine.scoring`) asks for each record what it needs to score it, and this module
answers with one read of each file:

* the feature cache may already hold the record's features; the model input is then read when first asked for;
* otherwise the source is read once: when the preprocessing cache has no fresh copy, that one read is cleaned,
  written to the cache and resized to the model input without being read back;
* a record whose point cloud (or RGB) is absent, unreadable or empty is read as a *degraded* input of the other
  modality alone, with the reason, so that the loop can hand it to the single-modality fallback. Both missing is
  an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.formats import assemble_sample, get_format
from mmiad.data.io import valid_points
from mmiad.data.preprocess import ModelInput, prepare_input, preprocess_sample
from mmiad.data.preprocess.cache import needs_preprocessing, preprocess_record
from mmiad.data.sample import Sample, SampleRecord
from mmiad.features.pipeline import FeaturePipeline, SampleFeatures


class MissingModalityError(DataError):
    """One modality of a sample cannot be used; the other one was read and is kept for a degraded score.

    Attributes:
        missing: ``"2d"`` or ``"3d"``.
        reason: The error that made it unusable (its file and problem).
        sample: The sample with the missing modality zeroed (an RGB of zeros, or a cloud without valid point).
    """

    def __init__(self, missing: str, reason: DataError, sample: Sample) -> None:
        super().__init__(reason.path, reason.problem)
        self.missing = missing
        self.reason = reason
        self.sample = sample


@dataclass
class LoadedRecord:
    """What the loop needs to score one record.

    Attributes:
        source: The user's record (what ``predictions.csv`` names).
        prepared: The record the features come from (the preprocessed copy, or ``source``).
        features: Cached features (then ``inputs`` is None and the features load it when asked).
        inputs: The model input to extract features from (a miss), or the degraded input.
        key: The feature cache key of a miss (None without a cache).
        missing: The missing modality of a degraded record, else None.
        reason: Why it is missing.
    """

    source: SampleRecord
    prepared: SampleRecord
    features: SampleFeatures | None = None
    inputs: ModelInput | None = None
    key: str | None = None
    missing: str | None = None
    reason: DataError | None = None


def read_record(record: SampleRecord) -> Sample:
    """Read a record's RGB and cloud once each, telling which modality is unusable.

    Raises:
        MissingModalityError: when exactly one modality is absent, unreadable or (the cloud) without a valid point.
        DataError: when neither is usable, or for a sample that does not fit together (sizes, mask).
    """
    reader = get_format(record.format)
    rgb = xyz = None
    problems: dict[str, DataError] = {}
    try:
        xyz = reader.read_xyz(record)
        if not valid_points(xyz).any():
            problems["3d"] = DataError(record.xyz_path, "the point cloud has no valid (non-zero, finite) point")
    except DataError as error:
        problems["3d"] = error
    try:
        rgb = reader.read_rgb(record)
    except DataError as error:
        problems["2d"] = error
    if len(problems) == 2:
        raise DataError(
            record.rgb_path, f"neither modality is usable ({problems['2d'].problem}; {problems['3d'].problem})"
        )
    if not problems:
        assert rgb is not None and xyz is not None
        return assemble_sample(record, rgb, xyz)
    missing, reason = next(iter(problems.items()))
    if missing == "3d":
        assert rgb is not None
        xyz = np.zeros((*rgb.shape[:2], 3), np.float32)
    else:
        assert xyz is not None
        rgb = np.zeros((*xyz.shape[:2], 3), np.uint8)
    gt_mask = reader.read_mask(record)
    if gt_mask is None and record.label == 0:
        gt_mask = np.zeros(rgb.shape[:2], bool)
    sample = Sample(rgb, xyz, valid_points(xyz), gt_mask, record.label, record.category, record.defect_type, record)
    raise MissingModalityError(missing, reason, sample)


def load_record(pipeline: FeaturePipeline, record: SampleRecord, *, keep_rgb: bool = False) -> LoadedRecord:
    """Everything needed to score ``record`` with ``pipeline``, each file read at most once.

    With ``keep_rgb`` the model input keeps the user's original RGB (``ModelInput.source_rgb``) when it was the
    one read, for outputs drawn at the original resolution (``predict``'s overlays).

    Raises:
        DataError: for a record that cannot be scored at all (a degraded one is returned, not raised).
    """
    try:
        prepared, cleaned = preprocess_record(record, pipeline.profile, pipeline.preprocess_root, load=read_record)
    except MissingModalityError as missing:
        return _degraded(pipeline, record, missing, keep_rgb)
    try:
        key, hit = pipeline._cached(prepared)
    except OSError:  # an input file is missing: not cacheable, and reading it below says which modality
        key, hit = None, None
    if hit is not None:
        if cleaned is not None:  # just preprocessed: the model input is at hand, no need to read the copy
            inputs: ModelInput | Callable[[], ModelInput] = _model_input(pipeline, cleaned, keep_rgb)
        else:  # read when the loop asks for it (it always does: labels, geometry)
            inputs = partial(_read_input, pipeline, prepared, keep_rgb)
        return LoadedRecord(record, prepared, features=SampleFeatures(hit.image, hit.points, inputs))
    if cleaned is None:
        try:
            cleaned = read_record(prepared)
        except MissingModalityError as missing:
            if prepared is not record:  # a preprocessed copy is never degraded: its source was whole
                raise DataError(missing.path, missing.problem) from missing
            return _degraded(pipeline, record, missing, keep_rgb)
    return LoadedRecord(record, prepared, inputs=_model_input(pipeline, cleaned, keep_rgb), key=key)


def _read_input(pipeline: FeaturePipeline, record: SampleRecord, keep_rgb: bool) -> ModelInput:
    return _model_input(pipeline, read_record(record), keep_rgb)


def _model_input(pipeline: FeaturePipeline, sample: Sample, keep_rgb: bool = False) -> ModelInput:
    """The resized model input; with ``keep_rgb`` it keeps the RGB when that is the user's own file (a profile
    that zeroes the background reads a cleaned copy instead, and then the user's RGB is read for the overlay)."""
    inputs = prepare_input(sample, size=pipeline.image_size, rgb_pad_mode=pipeline.profile.rgb_pad_mode)
    record = sample.record
    if keep_rgb and record is not None and not any(key == "preprocessed" for key, _ in record.extra):
        inputs.source_rgb = sample.rgb
    elif keep_rgb and record is not None and not pipeline.profile.zero_rgb_background:
        inputs.source_rgb = sample.rgb  # a cleaned copy keeps the user's RGB file when it does not zero it
    return inputs


def _degraded(
    pipeline: FeaturePipeline, record: SampleRecord, missing: MissingModalityError, keep_rgb: bool
) -> LoadedRecord:
    """The model input of the one usable modality; a cloud alone is cleaned as its format requires."""
    sample = missing.sample
    if missing.missing == "2d" and needs_preprocessing(record, pipeline.profile):
        sample = preprocess_sample(sample, pipeline.profile)
    return LoadedRecord(
        record,
        record,
        inputs=_model_input(pipeline, sample, keep_rgb and missing.missing == "3d"),
        missing=missing.missing,
        reason=missing.reason,
    )


def rgb_only_input(pipeline: FeaturePipeline, record: SampleRecord) -> ModelInput:
    """The model input a sample gets when its cloud is missing: its own RGB (never background-zeroed, there is no
    cloud to zero it by) and no valid point. Calibration scores the 2D-only fallback on it when the profile
    zeroes the RGB of whole samples, so that its threshold fits what a degraded sample will look like."""
    rgb = get_format(record.format).read_rgb(record)
    xyz = np.zeros((*rgb.shape[:2], 3), np.float32)
    sample = Sample(rgb, xyz, valid_points(xyz), None, record.label, record.category, record.defect_type, record)
    return _model_input(pipeline, sample)
