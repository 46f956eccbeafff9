"""Property-based fuzzing: random damage to RGB, xyz, mask, model and cache files.

Whatever the damage, only mmiad's own error types escape (``DataError``, ``ModelFileError``), the damaged sample
is either scored (finite score, a label or a stated reason) or reported naming one of its files, and the other
samples of the batch are scored exactly as without the damage.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmiad.data.errors import DataError
from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained, predict_records, run_models
from mmiad.features.cache import FeatureCache
from mmiad.methods.modelfile import ModelFileError

from .conftest import copy_record

DAMAGES = ("truncate", "flip", "zero_head", "random", "empty", "append")


def damage(path: Path, how: str, where: float, seed: int) -> None:
    """Damage a file in place: cut it, flip bytes, zero its header, replace it with noise, empty it, add junk."""
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    if how == "truncate":
        data = data[: int(where * len(data))]
    elif how == "flip":
        for offset in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
            data[offset] ^= int(rng.integers(1, 256))
    elif how == "zero_head":
        data[: max(1, int(where * 64))] = bytes(max(1, int(where * 64)))
    elif how == "random":
        data = bytearray(rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes())
    elif how == "empty":
        data = bytearray()
    else:
        data += rng.integers(0, 256, size=int(where * 4096) + 1, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def batch(hostile_run, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """(trained model, run, cache, three records with a mask on the middle one, baseline scores by sample id)."""
    run, cache = hostile_run
    trained = load_trained(run_models(run)["puck"], cache_dir=str(cache))
    folder = tmp_path_factory.mktemp("fuzz")
    source = list_records(tiny_dataset, "puck", "test")
    picked = [source[0], source[-1]]
    defective = next(r for r in source if r.gt_path is not None and r.sample_id not in {p.sample_id for p in picked})
    records = [copy_record(r, folder / f"s{i}") for i, r in enumerate([picked[0], defective, picked[1]])]
    records[1] = replace(copy_record(defective, folder / "s1"), gt_path=folder / "s1" / "mask.png")
    shutil.copy(defective.gt_path, records[1].gt_path)
    baseline = {p.record.sample_id: p.pred_score for p in predict_records(trained, records)}
    assert len(baseline) == 3
    return trained, run, cache, records, baseline


def _check_batch(predictions: list, errors: list[DataError], records: list, baseline: dict[str, float]) -> None:
    scored = {p.record.sample_id: p for p in predictions}
    for index in (0, 2):  # the undamaged samples: scored exactly as before
        assert scored[records[index].sample_id].pred_score == pytest.approx(baseline[records[index].sample_id])
    for prediction in predictions:
        assert math.isfinite(prediction.pred_score)
        assert prediction.pred_label in (0, 1) or prediction.note
    damaged = records[1]
    if damaged.sample_id not in scored:
        files = {damaged.rgb_path, damaged.xyz_path, damaged.gt_path}
        assert len(errors) == 1 and errors[0].path in files, errors
    else:
        assert errors == []


# A fixed, small draw in the suite (reproducible, ~1 s an example); MMIAD_FUZZ_EXAMPLES=500 fuzzes for real.
EXAMPLES = int(os.environ.get("MMIAD_FUZZ_EXAMPLES", "0")) or None


@settings(
    max_examples=EXAMPLES or 20,
    derandomize=EXAMPLES is None,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    target=st.sampled_from(["rgb", "xyz", "mask", "model", "cache"]),
    how=st.sampled_from(DAMAGES),
    where=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_damage_only_raises_mmiad_errors_and_keeps_the_batch(batch, target, how, where, seed) -> None:
    trained, run, cache, records, baseline = batch
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        middle = records[1]
        copy = replace(copy_record(middle, work), gt_path=work / "mask.png")
        shutil.copy(middle.gt_path, copy.gt_path)
        batch_records = [records[0], copy, records[2]]
        model = trained
        if target in ("rgb", "xyz", "mask"):
            damage({"rgb": copy.rgb_path, "xyz": copy.xyz_path, "mask": copy.gt_path}[target], how, where, seed)
        elif target == "model":
            path = work / "puck.safetensors"
            shutil.copy(run / "puck.safetensors", path)
            damage(path, how, where, seed)
            try:
                model = load_trained(path, cache_dir=str(cache))
            except ModelFileError as error:
                assert str(error).startswith(str(path)) and "\n" not in str(error)
                return
        else:
            pipeline = trained.model.pipeline
            prepared = pipeline.preprocess([copy])[0]
            entry = pipeline.cache._path(FeatureCache.key([prepared.rgb_path, prepared.xyz_path], pipeline.config()))
            damage(entry, how, where, seed)
        errors: list[DataError] = []
        predictions = list(predict_records(model, batch_records, errors=errors))
        if target == "model":
            # A damaged model that still loads may score differently, but never lets anything else escape.
            assert all(math.isfinite(p.pred_score) for p in predictions)
            assert len(predictions) + len(errors) >= 3 and all(isinstance(e, DataError) for e in errors)
            return
        _check_batch(predictions, errors, batch_records, baseline)
