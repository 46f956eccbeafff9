from __future__ import annotations

import torch

from mmiad.features.cache import FeatureCache


def test_key_depends_on_file_contents_and_config(tmp_path) -> None:
    data = tmp_path / "a.bin"
    data.write_bytes(b"one")
    key = FeatureCache.key([data], {"extractor": "x", "layers": [3, 7, 11]})
    assert key == FeatureCache.key([data], {"layers": [3, 7, 11], "extractor": "x"})
    assert key != FeatureCache.key([data], {"extractor": "x", "layers": [1, 4, 7]})
    data.write_bytes(b"two!")
    assert key != FeatureCache.key([data], {"extractor": "x", "layers": [3, 7, 11]})


def test_put_get_report_clear(tmp_path) -> None:
    cache = FeatureCache(tmp_path / "features")
    assert cache.get("ab" * 32) is None and cache.misses == 1
    cache.put("ab" * 32, {"image": torch.arange(4.0)})
    stored = cache.get("ab" * 32)
    assert stored is not None and torch.equal(stored["image"], torch.arange(4.0)) and cache.hits == 1
    report = cache.report()
    assert report.entries == 1 and report.bytes > 16
    assert not list((tmp_path / "features").rglob(".tmp-*"))
    assert cache.clear().entries == 1 and cache.report().entries == 0


def test_corrupt_entry_is_a_miss_and_removed(tmp_path) -> None:
    cache = FeatureCache(tmp_path)
    key = "cd" * 32
    cache.put(key, {"x": torch.zeros(2)})
    path = tmp_path / key[:2] / f"{key}.safetensors"
    path.write_bytes(path.read_bytes()[:10])
    assert cache.get(key) is None
    assert not path.exists()


def test_disabled_cache_stores_nothing(tmp_path) -> None:
    cache = FeatureCache(tmp_path / "off", enabled=False)
    cache.put("ef" * 32, {"x": torch.zeros(1)})
    assert cache.get("ef" * 32) is None and not (tmp_path / "off").exists()


def test_cache_hit_defers_reading_the_inputs_until_asked(tiny_dataset, tmp_path, monkeypatch) -> None:
    """Training from the cache needs only the features: a hit must not re-read and resize the sample's files,
    yet ``inputs`` (needed by prediction) must be what an eager read gives."""
    from mmiad.data.mvtec3d import list_categories, list_records
    from mmiad.features.registry import build_pipeline

    pipeline = build_pipeline("weightfree", profile="cfm", image_size=32, cache_dir=tmp_path)
    category = list_categories(tiny_dataset)[0]
    record = pipeline.preprocess(list_records(tiny_dataset, category, "train")[:1])[0]
    fresh = pipeline.extract(record)  # miss: extracts, stores
    reads: list[object] = []
    original = pipeline.load_inputs
    monkeypatch.setattr(pipeline, "load_inputs", lambda r: reads.append(r) or original(r))
    cached = pipeline.extract(record)
    assert pipeline.cache.hits == 1 and reads == []
    assert torch.equal(cached.image, fresh.image)
    assert torch.equal(cached.points.to_grid(32), fresh.points.to_grid(32))
    assert torch.equal(cached.inputs.rgb, fresh.inputs.rgb) and len(reads) == 1
    assert cached.inputs is cached.inputs and len(reads) == 1  # loaded once
