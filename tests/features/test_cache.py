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
