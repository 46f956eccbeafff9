"""M3DM's banks and scores against functional references written from the official code (nomewang/M3DM).

The references re-derive ``TripleFeatures`` / ``DoubleRGBPointFeatures`` (``run_coreset``,
``compute_single_s_s_map``) on tiny hand-made patch sets: concatenate every training image's rows, normalise
with scalar statistics, greedy k-centre coreset from row 0 (the feature widths here are below the
Johnson–Lindenstrauss bound, so the official projection fails and runs unprojected, as mmiad does), Euclidean
``cdist`` search, the reweighted image score. Distances are computed in float64 on the float16-rounded features the
greedy selection sees (the official loop runs in float16).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmiad.methods.m3dm import M3DM, FeatureFusionBlock
from mmiad.methods.m3dm.model import PatchSets
from mmiad.postprocess.smoothing import smooth_maps

GRID, RGB_GRID, SIZE, POINT_DIM, RGB_DIM = 8, 4, 16, 5, 3
FRACTION = 0.25


def _image(gen: torch.Generator, anomalous: bool = False) -> PatchSets:
    """One image's rows: a random foreground blob of point features (zeros elsewhere) and a 4×4 RGB grid."""
    foreground = torch.zeros(GRID, GRID, dtype=torch.bool)
    top, left = (int(v) for v in torch.randint(0, 3, (2,), generator=gen))
    foreground[top + 1 : top + 5, left + 1 : left + 6] = True
    foreground = foreground.flatten()
    point = torch.zeros(GRID * GRID, POINT_DIM)
    point[foreground] = torch.randn(int(foreground.sum()), POINT_DIM, generator=gen) + 1.0
    rgb = torch.randn(RGB_GRID * RGB_GRID, RGB_DIM, generator=gen)
    if anomalous:
        point[foreground.nonzero()[0]] += 4.0
        rgb[5] -= 3.0
    rgb_fine = F.interpolate(rgb.T.reshape(1, RGB_DIM, RGB_GRID, RGB_GRID), size=GRID).reshape(RGB_DIM, -1).T
    return PatchSets(point=point, foreground=foreground, rgb=rgb, rgb_fine=rgb_fine.contiguous())


def _data() -> tuple[list[PatchSets], list[PatchSets]]:
    gen = torch.Generator().manual_seed(7)
    return [_image(gen) for _ in range(6)], [_image(gen), _image(gen, anomalous=True)]


# ---------------------------------------------------------------------- the official computation, re-derived
def official_coreset(lib: torch.Tensor, n: int) -> torch.Tensor:
    """``get_coreset_idx_randomp`` without projection: start at row 0, add the row farthest from the selection."""
    z = lib.half().double()
    chosen = [0]
    min_distances = torch.linalg.norm(z - z[0], dim=1)
    for _ in range(n - 1):
        min_distances = torch.minimum(torch.linalg.norm(z - z[chosen[-1]], dim=1), min_distances)
        select = int(torch.argmax(min_distances))
        min_distances[select] = 0
        chosen.append(select)
    return torch.tensor(chosen)


def official_single(patch: torch.Tensor, lib: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, float]:
    """``compute_single_s_s_map`` up to the map: (per-patch min distance, reweighted image score)."""
    patch, lib = patch.double(), lib.double()
    dist = torch.cdist(patch, lib)
    min_val, min_idx = torch.min(dist, dim=1)
    s_idx = torch.argmax(min_val)
    s_star = torch.max(min_val) / scale
    m_test = patch[s_idx].unsqueeze(0)
    m_star = lib[min_idx[s_idx]].unsqueeze(0)
    _, nn_idx = torch.topk(torch.cdist(m_star, lib), k=3, largest=False)
    m_star_knn = torch.linalg.norm(m_test - lib[nn_idx[0, 1:]], dim=1) / scale
    d = math.sqrt(patch.shape[1])
    w = 1 - torch.exp(s_star / d) / torch.sum(torch.exp(m_star_knn / d))
    return min_val, float(w * s_star)


def official_banks(
    libs: dict[str, torch.Tensor], *, compat: bool, zero_row: bool
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
    """``run_coreset``: scalar statistics, point coreset first, then the others; TripleFeatures' zero row."""
    if compat:  # xyz_mean = mean(xyz lib), *_std = std(rgb lib), for every bank
        stats = {name: (float(libs["point"].mean()), float(libs["rgb"].std())) for name in libs}
    else:
        stats = {name: (float(lib.mean()), float(lib.std())) for name, lib in libs.items()}
    normed = {name: (lib - stats[name][0]) / stats[name][1] for name, lib in libs.items()}
    banks = {"point": normed["point"][official_coreset(normed["point"], int(FRACTION * len(normed["point"])))]}
    for name in [n for n in libs if n != "point"]:
        size = int(FRACTION * len(banks["point"])) if compat else int(FRACTION * len(normed[name]))
        banks[name] = normed[name][official_coreset(normed[name], size)]
    if zero_row:
        point = banks["point"]
        banks["point"] = torch.cat([point[torch.all(point != 0, dim=1)], torch.zeros(1, point.shape[1])])
    return banks, stats


def official_map(min_val: torch.Tensor, grid: int, smoothing: str) -> torch.Tensor:
    """Bilinear to the input size, then ``KNNGaussianBlur(4)`` (``pil_uint8``; ``gaussian`` is the paper's)."""
    resized = F.interpolate(min_val.float().view(1, 1, grid, grid), size=(SIZE, SIZE), mode="bilinear")
    return smooth_maps(resized[0, 0], smoothing, 4.0)


def _model(**options) -> M3DM:
    model = M3DM(
        rgb_grid=RGB_GRID,
        point_grid=GRID,
        image_size=SIZE,
        coreset_fraction=FRACTION,
        knn_backend="torch",
        **options,
    )
    torch.manual_seed(0)
    model.uff_ = FeatureFusionBlock(POINT_DIM, RGB_DIM).eval() if model.config.trains_uff else None
    return model


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("compat", [False, True])
def test_triple_all_rows_point_bank_matches_official(compat: bool) -> None:
    train, test = _data()
    model = _model(compat=compat)
    assert model.config.point_coreset == "all_rows" and model.config.variant == "triple"
    model._build_banks(train)
    libs = {
        "point": torch.cat([s.point for s in train]),
        "rgb": torch.cat([s.rgb for s in train]),
        "fused": torch.cat([model.fused(s) for s in train]),
    }
    banks, stats = official_banks(libs, compat=compat, zero_row=True)
    # 10 % of *all* 384 point rows (background included), then the zero row: 96 + 1
    assert len(model.banks_["point"]) == len(banks["point"]) == int(FRACTION * 6 * GRID * GRID) + 1
    for name, bank in banks.items():
        torch.testing.assert_close(model.banks_[name].bank, bank.float(), rtol=1e-5, atol=1e-5)
        assert (model.banks_[name].mean, model.banks_[name].std) == pytest.approx(stats[name])
    lambdas = model.config.lambdas
    for sets in test:
        scores, maps = model._score_sets(sets)
        rows = {"point": sets.point, "rgb": sets.rgb, "fused": model.fused(sets)}
        grids = {"point": GRID, "rgb": RGB_GRID, "fused": GRID}
        for i, name in enumerate(("point", "rgb", "fused")):
            mean, std = stats[name]
            min_val, score = official_single((rows[name] - mean) / std, banks[name])
            assert scores[i] == pytest.approx(lambdas[i] * score, rel=1e-5)
            expected = lambdas[i] * official_map(min_val, grids[name], model.settings.smoothing).double().numpy()
            assert maps[i] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_foreground_point_coreset_option_matches_its_reference() -> None:
    train, test = _data()
    model = _model(point_coreset="foreground")
    model._build_banks(train)
    every_row = torch.cat([s.point for s in train])
    foreground = torch.cat([s.point[s.foreground] for s in train])
    mean, std = float(every_row.mean()), float(every_row.std())  # statistics still over every patch
    normed = (foreground - mean) / std
    bank = normed[official_coreset(normed, int(FRACTION * len(foreground)))]
    torch.testing.assert_close(model.banks_["point"].bank, bank.float(), rtol=1e-5, atol=1e-5)
    for sets in test:
        scores, maps = model._score_sets(sets)
        min_fg, score = official_single((sets.point[sets.foreground] - mean) / std, bank)
        min_val = torch.zeros(GRID * GRID, dtype=torch.float64)
        min_val[sets.foreground] = min_fg
        assert scores[0] == pytest.approx(score, rel=1e-5)
        assert maps[0] == pytest.approx(
            official_map(min_val, GRID, model.settings.smoothing).double().numpy(), rel=1e-4, abs=1e-5
        )


@pytest.mark.parametrize("compat", [False, True])
def test_double_variant_matches_official_dino_point_mae(compat: bool) -> None:
    train, test = _data()
    model = _model(variant="double", compat=compat)
    assert model.uff_ is None and not model.config.trains_uff
    model._build_banks(train)
    assert set(model.banks_) == {"point", "rgb"}
    libs = {"point": torch.cat([s.point for s in train]), "rgb": torch.cat([s.rgb for s in train])}
    banks, stats = official_banks(libs, compat=compat, zero_row=False)  # DoubleRGBPointFeatures: no zero row
    for name, bank in banks.items():
        torch.testing.assert_close(model.banks_[name].bank, bank.float(), rtol=1e-5, atol=1e-5)
    for sets in test:
        scores, maps = model._score_sets(sets)
        assert scores.shape == (2,) and maps.shape == (2, SIZE, SIZE)
        for i, (name, rows, grid) in enumerate((("point", sets.point, GRID), ("rgb", sets.rgb, RGB_GRID))):
            mean, std = stats[name]
            min_val, score = official_single((rows - mean) / std, banks[name], scale=1000.0)
            assert scores[i] == pytest.approx(model.config.lambdas[i] * score, rel=1e-5)
            # the maps are *not* divided by 1000
            expected = model.config.lambdas[i] * official_map(min_val, grid, model.settings.smoothing).double().numpy()
            assert maps[i] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        unscaled = official_single((sets.point - stats["point"][0]) / stats["point"][1], banks["point"])[1]
        assert scores[0] != pytest.approx(unscaled / 1000.0, rel=1e-3)  # the /1000 also moves the weight w


def test_options_are_validated() -> None:
    for bad in ({"variant": "quad"}, {"point_coreset": "some"}, {"uff_scope": "run"}, {"max_train_samples": 0}):
        with pytest.raises(ValueError):
            M3DM(**bad)
    assert not M3DM(variant="double").config.trains_uff and M3DM().config.trains_uff


# ---------------------------------------------------------------------- UFF over all categories (fusion_pretrain.py)
def _uff_state(model: M3DM) -> dict[str, torch.Tensor]:
    assert model.uff_ is not None
    return model.uff_.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_uff_is_trained_once_on_all_categories_of_a_run(tiny_dataset, tiny_hparams, tmp_path) -> None:
    """Official: one UFF trained on the union of every category's first ``max_train_samples`` training samples."""
    from mmiad.data.mvtec3d import list_records
    from mmiad.engine import train_run
    from mmiad.engine.trained import load_trained

    hparams = {**tiny_hparams["m3dm"], "epochs": 1, "batch_size": 2, "accum_iter": 1, "max_train_samples": 2}
    cache = str(tmp_path / "cache")
    files, _ = train_run("m3dm", tiny_dataset, tmp_path / "run", hparams=hparams, cache_dir=cache, fallback=False)
    models = {category: load_trained(path, cache_dir=cache).model for category, path in files.items()}
    assert sorted(models) == ["block", "puck"]
    # The tiny dataset has a validation split, so the training records are the whole train split; the reference
    # UFF is trained directly on the (preprocessed) records the official fusion_pretrain.py would have seen.
    reference = M3DM(**hparams, cache_dir=cache)
    usable = {c: reference._usable(list_records(tiny_dataset, c, "train"), False, None) for c in models}
    assert all(len(records) == 2 for records in usable.values())  # max_train_samples
    reference._train_uff([r for c in sorted(usable) for r in usable[c]], progress=False)
    shared = _uff_state(reference)
    for category, model in models.items():
        assert model.loss_history_ and all(math.isfinite(v) for v in model.loss_history_)  # the UFF did train
        assert _same(_uff_state(model), shared), category
        assert model.get_config()["uff"] == {"scope": "shared", "categories": ["block", "puck"], "n_samples": 4}
        assert model.n_train_samples_ == 2  # max_train_samples caps the banks too
    # uff_scope="category": nothing is shared, and a UFF of one category's samples differs from the shared one
    assert M3DM(**hparams, uff_scope="category").fit_shared(usable) is None
    assert M3DM(**hparams, variant="double").fit_shared(usable) is None
    reference._train_uff(usable["puck"], progress=False)
    assert not _same(_uff_state(reference), shared)


# ---------------------------------------------------------------------- UFF optimisation (engine_fusion_pretrain.py)
def official_lr(epoch: float, base: float, warmup: int, epochs: int) -> float:
    """``lr_sched.adjust_learning_rate`` with ``min_lr=0``: linear warm-up, then half-cycle cosine, per iteration."""
    if epoch < warmup:
        return base * epoch / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


@pytest.mark.parametrize("compat", [False, True])
def test_uff_training_follows_the_official_gradient_accumulation(compat: bool, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(11)
    rows = {i: (torch.randn(6, POINT_DIM, generator=gen), torch.randn(6, RGB_DIM, generator=gen)) for i in range(8)}
    options = {"epochs": 3, "warmup_epochs": 1, "batch_size": 2, "accum_iter": 3, "learning_rate": 0.01}
    model = M3DM(**options, weight_decay=0.01, compat=compat)
    monkeypatch.setattr(model, "_uff_dims", lambda record: (POINT_DIM, RGB_DIM))
    monkeypatch.setattr(
        model, "_uff_batch", lambda records, g: tuple(torch.cat([rows[r][j] for r in records]) for j in (0, 1))
    )
    history = model._train_uff(list(range(8)), progress=False)
    assert len(history) == 3

    # train_one_epoch: lr set at the first batch of each group of accum_iter batches, loss / accum_iter, a step
    # after each full group; the leftover 4th batch of each epoch is discarded officially (applied by default).
    torch.manual_seed(0)
    block = FeatureFusionBlock(POINT_DIM, RGB_DIM)
    optimizer = torch.optim.AdamW(block.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.01)
    order_gen = torch.Generator().manual_seed(0)  # mmiad's shuffle (the official DistributedSampler's differs)
    for epoch in range(3):
        order = torch.randperm(8, generator=order_gen).tolist()
        optimizer.zero_grad()
        for step in range(4):
            if step % 3 == 0:
                for group in optimizer.param_groups:
                    group["lr"] = official_lr(step / 4 + epoch, 0.01, 1, 3)
            batch = order[2 * step : 2 * step + 2]
            loss = block.contrastive_loss(
                torch.cat([rows[r][0] for r in batch]), torch.cat([rows[r][1] for r in batch])
            )
            (loss / 3).backward()
            if (step + 1) % 3 == 0:
                optimizer.step()
                optimizer.zero_grad()
        if not compat:
            optimizer.step()
    expected = block.state_dict()
    for key, value in model.uff_.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patches", ["nonzero", "foreground"])
def test_uff_patches_foreground_or_the_literal_all_channels_nonzero_test(patches: str, monkeypatch) -> None:
    train, _ = _data()
    sets = train[0]
    sets.point[sets.foreground.nonzero()[:3, 0], 2] = 0.0  # foreground rows with one empty channel (FPFH-like)
    model = M3DM(uff_patches=patches, rgb_grid=RGB_GRID, point_grid=GRID)
    model._pipeline = type("Stub", (), {"extract": staticmethod(lambda record: record)})()
    monkeypatch.setattr(model, "_sets", lambda features: features)
    point, rgb = model._uff_batch([sets], torch.Generator())
    # official FeatureFusionBlock.forward: torch.all(xyz_feature != 0, dim=1)
    keep = torch.all(sets.point != 0, dim=1) if patches == "nonzero" else sets.foreground
    assert int(keep.sum()) == int(sets.foreground.sum()) - (3 if patches == "nonzero" else 0)
    torch.testing.assert_close(point, sets.point[keep])
    torch.testing.assert_close(rgb, sets.rgb_fine[keep])


def test_max_train_samples_counts_per_category() -> None:
    """``--max_sample 400`` is per class in the official loop; a unified run must keep every category's first N."""
    from pathlib import Path

    from mmiad.data.sample import SampleRecord

    records = [SampleRecord(Path(f"{c}{i}.png"), Path(f"{c}{i}.tiff"), c, "train") for c in "ab" for i in range(4)]
    model = M3DM(max_train_samples=3)
    stub = type("Stub", (), {})()
    stub.preprocess = lambda chosen, **_: chosen
    stub.iter_features = lambda prepared, **_: ((record, None) for record in prepared)
    model._pipeline = stub
    kept = model._usable(records, False, None)
    assert [(r.category, r.xyz_path.name) for r in kept] == [(c, f"{c}{i}.tiff") for c in "ab" for i in range(3)]
    assert M3DM().config.max_train_samples == 401
