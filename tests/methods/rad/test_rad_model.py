"""RAD's scores against a float64 re-derivation, its memory, the 3D extension and its features."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mmiad.data.mvtec3d import list_records
from mmiad.engine import TrainedModel, load_trained, save_trained
from mmiad.features.registry import image_extractors
from mmiad.features.vit import VIT_PRESETS, VisionTransformer
from mmiad.features.vit_tokens import VitTokensExtractor, split_tokens
from mmiad.methods.rad import RAD, RADConfig
from mmiad.methods.rad.memory import RadMemory

from .test_rad_retrieval import window_reference

GRID = (4, 5)
P = GRID[0] * GRID[1]


def unit_np(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def random_bank(seed: int, images: int = 6, levels: int = 2, channels: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "cls": rng.normal(size=(images, channels)) * 2,
        "levels": rng.normal(size=(levels, images, P, channels)) * 3,
        "points": rng.normal(size=(images, P, 5)),
        "foreground": rng.random((images, P)) > 0.3,
    }


def model_with(bank: dict[str, np.ndarray], three_d: bool = False, **hparams: object) -> RAD:
    """A RAD whose memory holds ``bank`` (what fit stores, without a dataset)."""
    model = RAD(device="cpu", **{"center": False, **hparams})  # type: ignore[arg-type]
    memory = RadMemory(GRID, model.settings.memory_dtype)
    for i in range(bank["cls"].shape[0]):
        levels = [torch.from_numpy(level[i]) for level in bank["levels"]]
        points = torch.from_numpy(bank["points"][i]) if three_d else None
        foreground = torch.from_numpy(bank["foreground"][i]) if three_d else None
        memory.add(torch.from_numpy(bank["cls"][i]), levels, points, foreground)
    memory.finish()
    model.memory_, model.grid_, model.fitted_ = memory, GRID, True
    return model


def reference_2d(
    bank: dict, cls: np.ndarray, levels: list[np.ndarray], k: int, radius: int, weights=None, center: bool = False
) -> np.ndarray:
    """Official formulas in float64: CLS top-k, per level 1 − windowed max cosine, weighted mean of the levels
    (``center``: mmiad's option, every token minus the memory's per-channel mean first)."""
    cosine = unit_np(bank["cls"]) @ unit_np(cls)
    top = np.argsort(-cosine)[:k]
    weights = np.full(len(levels), 1 / len(levels)) if weights is None else np.asarray(weights) / np.sum(weights)
    fused = np.zeros(P)
    for index, query in enumerate(levels):
        mean = bank["levels"][index].reshape(-1, query.shape[1]).mean(axis=0) if center else 0.0
        refs = unit_np(bank["levels"][index][top] - mean)
        fused += weights[index] * (1 - window_reference(unit_np(query - mean), refs, GRID, radius))
    return fused


def query_of(seed: int, channels: int = 8) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=channels),
        [rng.normal(size=(P, channels)) for _ in range(2)],
        rng.normal(size=(P, 5)),
        (rng.random(P) > 0.4),
    )


def tokens_of(cls: np.ndarray, levels: list[np.ndarray], points=None, foreground=None) -> tuple:
    as_t = torch.from_numpy
    return (
        as_t(cls),
        [as_t(level) for level in levels],
        None if points is None else as_t(points),
        None if foreground is None else as_t(foreground),
    )


@pytest.mark.parametrize(("k", "radius"), [(3, 1), (2, 0), (6, 2)])
def test_patch_scores_match_the_float64_formulas(k: int, radius: int) -> None:
    bank = random_bank(0)
    cls, levels, _, _ = query_of(1)
    model = model_with(bank, k_image=k, pos_radius=radius, memory_dtype="float32")
    got = model.patch_scores(tokens_of(cls, levels), GRID)["fused"].numpy()
    np.testing.assert_allclose(got, reference_2d(bank, cls, levels, k, radius), atol=1e-5)


def test_float16_memory_moves_scores_by_little_and_k_is_clamped() -> None:
    bank = random_bank(2)
    cls, levels, _, _ = query_of(3)
    half = model_with(bank, k_image=500, memory_dtype="float16")  # 500 > 6 images: clamped, not a crash
    got = half.patch_scores(tokens_of(cls, levels), GRID)["fused"].numpy()
    np.testing.assert_allclose(got, reference_2d(bank, cls, levels, 6, 1), atol=2e-3)


def test_a_stored_image_matches_itself_and_single_level_weights_select_a_level() -> None:
    bank = random_bank(4)
    model = model_with(bank, k_image=2, memory_dtype="float32")
    own = tokens_of(bank["cls"][3], [bank["levels"][0][3], bank["levels"][1][3]])
    np.testing.assert_allclose(model.patch_scores(own, GRID)["fused"].numpy(), 0.0, atol=1e-6)
    cls, levels, _, _ = query_of(5)
    only_second = model_with(bank, k_image=2, memory_dtype="float32", layer_weights=(0.0, 1.0))
    got = only_second.patch_scores(tokens_of(cls, levels), GRID)["fused"].numpy()
    np.testing.assert_allclose(got, reference_2d(bank, cls, levels, 2, 1, weights=[0, 1]), atol=1e-5)


@pytest.mark.parametrize(("fusion", "center"), [("product", False), ("sum", False), ("product", True)])
def test_3d_extension_scores_foreground_only_and_fuses(fusion: str, center: bool) -> None:
    bank = random_bank(6)
    cls, levels, points, foreground = query_of(7)
    hparams = {"k_image": 3, "memory_dtype": "float32", "modality": "2d+3d", "fusion": fusion, "center": center}
    model = model_with(bank, three_d=True, **hparams)
    maps = model.patch_scores(tokens_of(cls, levels, points, foreground), GRID)
    top = np.argsort(-(unit_np(bank["cls"]) @ unit_np(cls)))[:3]
    mean = bank["points"][bank["foreground"]].mean(axis=0) if center else 0.0  # over the foreground cells only
    refs = unit_np(bank["points"][top] - mean)
    best = window_reference(unit_np(points - mean), refs, GRID, 1, bank["foreground"][top])
    expected_3d = np.where(foreground, 1 - np.maximum(best, -1.0), 0.0)
    np.testing.assert_allclose(maps["3d"].numpy(), expected_3d, atol=1e-5)
    np.testing.assert_allclose(maps["2d"].numpy(), reference_2d(bank, cls, levels, 3, 1, center=center), atol=1e-5)
    combined = maps["2d"] * maps["3d"] if fusion == "product" else maps["2d"] + maps["3d"]
    np.testing.assert_allclose(maps["fused"].numpy(), combined.numpy(), atol=1e-7)


def test_memory_size_per_image_is_what_it_stores() -> None:
    bank = random_bank(8)
    for dtype, item in (("float16", 2), ("float32", 4)):
        memory = model_with(bank, three_d=True, memory_dtype=dtype).memory_
        tensors = memory.tensors()
        stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.startswith("mean."))
        assert memory.bytes_per_image() * 6 == stored
        assert memory.bytes_per_image() == (2 * 8 + 5) * P * item + 8 * 4 + P
    # DINO ViT-B/8 at 224, 4 levels, fp16: 4 × 784 × 768 × 2 B + the fp32 CLS row = 4.82 MB (official: 9.63 MB)
    full = RadMemory((28, 28))
    full.add(torch.ones(768), [torch.ones(784, 768)] * 4)
    full.finish()
    assert full.bytes_per_image() == 4 * 784 * 768 * 2 + 768 * 4 == 4_819_968


def test_results_do_not_depend_on_the_category_order(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    block, puck = list_records(tiny_dataset, "block", "train"), list_records(tiny_dataset, "puck", "train")
    test = list_records(tiny_dataset, "puck", "test")
    first = RAD(cache_dir=cache, **RAD.tiny_hparams).fit(block + puck)
    second = RAD(cache_dir=cache, **RAD.tiny_hparams).fit(puck + block)
    a, b = list(first.predict(test)), list(second.predict(test))
    np.testing.assert_array_equal([p.pred_score for p in a], [p.pred_score for p in b])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.anomaly_map, y.anomaly_map)


def test_3d_extension_round_trips_through_a_model_file(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    train, test = list_records(tiny_dataset, "puck", "train"), list_records(tiny_dataset, "puck", "test")
    model = RAD(cache_dir=cache, modality="2d+3d", **RAD.tiny_hparams).fit(train)
    predictions = list(model.predict(test))
    assert set(predictions[0].modality_maps) == {"2d", "3d"}
    path = save_trained(tmp_path / "m.safetensors", TrainedModel(model, None, {"category": "puck"}))
    loaded = load_trained(path, cache_dir=cache)
    again = list(loaded.model.predict(test))
    np.testing.assert_allclose([p.pred_score for p in again], [p.pred_score for p in predictions], rtol=1e-6)
    assert loaded.model.memory_.points is not None


def test_bad_settings_are_refused() -> None:
    for bad in ({"modality": "xyz"}, {"k_image": 0}, {"pos_radius": -1}, {"dataset": "mvtec"}, {"max_ratio": 2}):
        with pytest.raises(ValueError):
            RADConfig(**bad)  # type: ignore[arg-type]
    assert RADConfig(dataset="visa").retrieval() == (900, 2)
    weightfree = RAD(device="cpu")  # texture descriptors are non-negative: centred by default (see the config)
    assert weightfree.centred(False) and weightfree.centred(True)
    assert not RAD(device="cpu", center=False).centred(False)
    assert RADConfig().retrieval() == (150, 1)


def test_rad_extractor_packs_the_blocks_and_the_cls_token() -> None:
    """The packed map holds blocks 3/6/9/11 (as ``forward_layers``) and the block-11 normed CLS, on a narrow ViT."""
    assert image_extractors()["dino_vitb8_rad"].needs_weights
    torch.manual_seed(0)
    narrow = replace(VIT_PRESETS["dino_vitb8"], name="narrow", embed_dim=32, num_heads=2)
    model = VisionTransformer(narrow).eval()
    torch.nn.init.normal_(model.cls_token)
    torch.nn.init.normal_(model.pos_embed)
    extractor = VitTokensExtractor(model, "random-0")
    rgb = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    packed = extractor.extract(rgb)
    assert packed.shape == (2, 5 * 32, 4, 4) and extractor.out_channels == 160
    levels, cls = split_tokens(packed[1], 4, 32)
    with torch.inference_mode():
        maps = model.forward_layers(rgb, (3, 6, 9, 11))
        x = model.patch_embed(rgb).flatten(2).transpose(1, 2)
        x = torch.cat([model.cls_token.expand(2, -1, -1), x], dim=1) + model.position_embedding(4, 4)
        for block in model.blocks:
            x = block(x)
        expected_cls = model.norm(x)[1, 0]
    for level, block_map in zip(levels, maps, strict=True):
        torch.testing.assert_close(level, block_map[1].reshape(32, -1).T)
    torch.testing.assert_close(cls, expected_cls, atol=1e-5, rtol=1e-5)
