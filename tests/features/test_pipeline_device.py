"""The feature pipeline on a device and in a precision: CPU float32 results, batched 2D forwards, cache semantics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mmiad.data.errors import DataError
from mmiad.data.mvtec3d import list_categories, list_records
from mmiad.data.preprocess import get_profile
from mmiad.data.sample import SampleRecord
from mmiad.features.cache import FeatureCache
from mmiad.features.pipeline import FeaturePipeline, SampleFeatures
from mmiad.features.pointmae import PointMaeExtractor
from mmiad.features.registry import build_pipeline
from mmiad.features.vit import VitExtractor

SIZE = 32  # model input side: a multiple of the tiny ViT's 4-pixel patches


def deep_pipeline(
    vit: VitExtractor, pointmae: PointMaeExtractor, root: Path, *, cache: bool = False, **options: str
) -> FeaturePipeline:
    store = FeatureCache(root / "features") if cache else None
    return FeaturePipeline(vit, pointmae, get_profile("cfm"), SIZE, store, root, **options)


@pytest.fixture
def records(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[SampleRecord]:
    """Five preprocessed training records of the tiny synthetic dataset."""
    category = list_categories(tiny_dataset)[0]
    pipeline = build_pipeline("weightfree", profile="cfm", image_size=SIZE, cache_dir=tmp_path_factory.mktemp("pre"))
    return pipeline.preprocess(list_records(tiny_dataset, category, "train")[:5])


def count_batches(pipeline: FeaturePipeline) -> list[int]:
    """Record the batch size of every 2D extractor call."""
    sizes: list[int] = []
    original = pipeline.image_extractor.extract

    def counting(rgb: torch.Tensor) -> torch.Tensor:
        sizes.append(int(rgb.shape[0]))
        return original(rgb)

    pipeline.image_extractor.extract = counting  # type: ignore[method-assign]
    return sizes


def assert_same_features(got: SampleFeatures, expected: SampleFeatures, exact: bool = True) -> None:
    assert got.image.device.type == "cpu" and got.image.dtype == torch.float32
    assert got.points.features.device.type == "cpu" and got.points.features.dtype == torch.float32
    if exact:
        assert torch.equal(got.image, expected.image)
    else:  # a batched forward: other matrix shapes, so float rounding may differ
        torch.testing.assert_close(got.image, expected.image, rtol=1e-5, atol=1e-5)
    for name in ("features", "pixel_index", "neighbors", "weights"):
        assert torch.equal(getattr(got.points, name), getattr(expected.points, name)), name


def test_deep_pipeline_on_a_device_equals_the_cpu(
    compute_device: str, records: list[SampleRecord], tmp_path: Path, tiny_vit: Callable, tiny_pointmae: Callable
) -> None:
    cpu = deep_pipeline(tiny_vit(), tiny_pointmae(), tmp_path)
    device = deep_pipeline(tiny_vit(), tiny_pointmae(), tmp_path, device=compute_device)
    expected = [cpu.extract(record) for record in records[:2]]
    got = [features for _, features in device.iter_features(records[:2])]
    assert device.compute_device().type == torch.device(compute_device).type
    assert tiny_vit().config() == device.image_extractor.config() and cpu.config() == device.config()
    for one, reference in zip(got, expected, strict=True):
        if compute_device == "cpu":
            assert_same_features(one, reference, exact=False)
        else:  # other kernels: the image map to a stated tolerance, the projection indices exactly
            torch.testing.assert_close(one.image, reference.image, rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(one.points.features, reference.points.features, rtol=1e-2, atol=1e-2)
            assert torch.equal(one.points.neighbors, reference.points.neighbors)
    # One modality outside the cache (the modality fallback's way): the same features, on the CPU in float32.
    inputs = got[0].inputs
    image = device.image_features(inputs.rgb[None])
    points = device.point_features(inputs.xyz, inputs.valid)
    assert image.device.type == "cpu" and image.dtype == torch.float32 and torch.equal(image[0], got[0].image)
    assert points.device.type == "cpu" and torch.equal(points.features, got[0].points.features)


def test_weightfree_pipeline_on_a_device_equals_the_cpu(
    compute_device: str, records: list[SampleRecord], tmp_path: Path
) -> None:
    """Texture moves with the device, FPFH stays on the CPU: both come back as on a CPU-only run."""
    cpu = build_pipeline("weightfree", profile="cfm", image_size=SIZE, cache_dir=tmp_path / "a")
    device = build_pipeline(
        "weightfree", profile="cfm", image_size=SIZE, cache_dir=tmp_path / "b", device=compute_device
    )
    expected = cpu.extract(records[0])
    got = device.extract(records[0])
    assert device.point_extractor.config() == cpu.point_extractor.config()
    if compute_device == "cpu":
        assert_same_features(got, expected)
    else:
        torch.testing.assert_close(got.image, expected.image, rtol=1e-3, atol=1e-3)
        assert torch.equal(got.points.features, expected.points.features)  # FPFH: the same NumPy code


def test_batched_iteration_equals_one_record_at_a_time(
    records: list[SampleRecord], tmp_path: Path, tiny_vit: Callable, tiny_pointmae: Callable
) -> None:
    single = deep_pipeline(tiny_vit(), tiny_pointmae(), tmp_path)
    expected = [single.extract(record) for record in records]
    batched = deep_pipeline(tiny_vit(), tiny_pointmae(), tmp_path)
    sizes = count_batches(batched)
    got = list(batched.iter_features(records, batch_size=3))
    assert sizes == [3, 2]
    assert [record for record, _ in got] == records
    for (_, features), reference in zip(got, expected, strict=True):
        assert_same_features(features, reference, exact=False)
        assert torch.equal(features.inputs.rgb, reference.inputs.rgb)
    with pytest.raises(ValueError, match="batch_size"):
        next(batched.iter_features(records, batch_size=0))


def test_batches_skip_cache_hits(
    records: list[SampleRecord], tmp_path: Path, tiny_vit: Callable, tiny_pointmae: Callable
) -> None:
    pipeline = deep_pipeline(tiny_vit(), tiny_pointmae(), tmp_path, cache=True)
    warm = {1: pipeline.extract(records[1]), 3: pipeline.extract(records[3])}
    sizes = count_batches(pipeline)
    got = [features for _, features in pipeline.iter_features(records)]
    assert sizes == [3]  # one forward, for the three misses only
    assert pipeline.cache is not None and pipeline.cache.hits == 2
    for index, features in warm.items():
        assert_same_features(got[index], features)
    again = [features for _, features in pipeline.iter_features(records)]
    assert sizes == [3] and pipeline.cache.hits == 7  # everything now from the cache
    for features, reference in zip(again, got, strict=True):
        assert_same_features(features, reference)


def test_a_bad_record_is_reported_and_the_others_kept(
    records: list[SampleRecord], tmp_path: Path, tiny_vit: Callable, tiny_pointmae: Callable
) -> None:
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"not a png")
    bad = dataclasses.replace(records[2], rgb_path=garbage)
    batch = [*records[:2], bad, *records[2:4]]
    pipeline = deep_pipeline(tiny_vit(), tiny_pointmae(), tmp_path, cache=True)
    errors: list[DataError] = []
    got = list(pipeline.iter_features(batch, errors=errors, batch_size=8))
    assert [record for record, _ in got] == [*records[:2], *records[2:4]]
    assert len(errors) == 1 and str(garbage) in str(errors[0])
    reference = deep_pipeline(tiny_vit(), tiny_pointmae(), tmp_path)
    for record, features in got:
        assert_same_features(features, reference.extract(record), exact=False)
    yielded = []
    with pytest.raises(DataError):
        for record, _ in pipeline.iter_features(batch, batch_size=8):
            yielded.append(record)
    assert yielded == records[:2]  # the records before the bad one still come out


def test_reading_ahead_on_a_thread_changes_nothing(
    records: list[SampleRecord], tmp_path: Path, tiny_vit: Callable, tiny_pointmae: Callable
) -> None:
    """The read-ahead an accelerator uses (forced here on the CPU): same records, same order, same features,
    and a bad record in the middle batch still costs only itself."""
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"not a png")
    batch = [*records[:3], dataclasses.replace(records[3], rgb_path=garbage), records[4], *records[:2]]
    runs = {}
    for overlap in (False, True):
        pipeline = deep_pipeline(tiny_vit(), tiny_pointmae(), tmp_path / str(overlap), cache=True)
        sizes = count_batches(pipeline)
        errors: list[DataError] = []
        runs[overlap] = (list(pipeline.iter_features(batch, errors=errors, batch_size=2, overlap=overlap)), errors)
        assert sizes == [2, 1, 1]  # misses only: the last batch's two records are cache hits by then
        assert pipeline.cache is not None and pipeline.cache.hits == 2
    (plain, plain_errors), (ahead, ahead_errors) = runs[False], runs[True]
    assert [r for r, _ in ahead] == [r for r, _ in plain] == [*records[:3], records[4], *records[:2]]
    assert [str(e) for e in ahead_errors] == [str(e) for e in plain_errors] and len(ahead_errors) == 1
    for (_, got), (_, expected) in zip(ahead, plain, strict=True):
        assert_same_features(got, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_fails_clearly_on_first_use(device: str, records: list[SampleRecord], tmp_path) -> None:
    pipeline = build_pipeline("weightfree", profile="cfm", image_size=SIZE, cache_dir=tmp_path, device=device)
    with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
        pipeline.extract(records[0])
    with pytest.raises(ValueError, match="no CUDA device"):
        next(pipeline.iter_features(records, errors=[]))


def test_precision_changes_the_features_a_little_and_their_cache_key(
    records: list[SampleRecord], tmp_path: Path, tiny_vit: Callable, tiny_pointmae: Callable
) -> None:
    vit, pointmae = tiny_vit(), tiny_pointmae()
    full = deep_pipeline(vit, pointmae, tmp_path, cache=True)
    low = deep_pipeline(vit, pointmae, tmp_path, cache=True, precision="bf16")
    assert "precision" not in full.config() and low.config()["precision"] == "bf16"
    reference = full.extract(records[0])
    features = low.extract(records[0])
    assert low.cache is not None and low.cache.hits == 0 and low.cache.report().entries == 2
    # fp32 is exactly the extractors' own output: no autocast, no cast.
    with torch.inference_mode():
        assert torch.equal(reference.image, vit.extract(reference.inputs.rgb[None])[0])
        direct = pointmae.extract(reference.inputs.xyz, reference.inputs.valid)
    assert torch.equal(reference.points.features, direct.features)
    assert features.image.dtype == torch.float32 and features.points.features.dtype == torch.float32
    for got, expected in ((features.image, reference.image), (features.points.features, reference.points.features)):
        error = float((got - expected).abs().max() / expected.abs().max())
        assert 0 < error <= 3e-2  # the bf16 bound of tests/features/test_device.py
    assert torch.equal(features.points.weights, reference.points.weights)
