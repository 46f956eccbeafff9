from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mmiad.methods.unircm import UniRCM, UniRCMConfig
from mmiad.methods.unircm.model import combine_scores
from mmiad.methods.unircm.store import GridStore
from mmiad.methods.unircm.training import direction_loss, feature_mean_squares, mse_scales

GRID = 8
TINY = {
    "grid_size": GRID,
    "image_size": 16,
    "hidden": 16,
    "num_blocks": 1,
    "epochs": 4,
    "batch_size": 2,
    "learning_rate": 3e-3,
    "orq_layers": 2,
    "codebook_size_2d": 8,
    "codebook_size_3d": 8,
    "orq_iterations": 5,
    "device": "cpu",
    "seed": 3,
}


def category(
    n: int, shift: float, seed: int, offset: int = 0
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Synthetic grids: 3D = smooth random field, 2D = a fixed linear map of it (+shift), a foreground square."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(4, 6, generator=torch.Generator().manual_seed(99))
    foreground = torch.zeros(GRID, GRID, dtype=torch.bool)
    foreground[1:7, 1:7] = True
    store = {}
    for i in range(n):
        rows_3d = torch.randn(GRID * GRID, 4, generator=generator) * 0.3 + shift
        rows_2d = rows_3d @ mixing + 0.05 * torch.randn(GRID * GRID, 6, generator=generator)
        mask = foreground.flatten()
        store[offset + i] = (rows_2d * mask[:, None], rows_3d * mask[:, None], mask)
    return store


def test_score_formula_by_hand() -> None:
    map_2d, map_3d = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.5])
    orq_2d, orq_3d = torch.tensor([10.0, 0.0]), torch.tensor([2.0, 4.0])
    result = combine_scores(map_2d, map_3d, orq_2d, orq_3d, 0.05, 0.1)
    torch.testing.assert_close(result, torch.tensor([(1 + 0.5) * (3 + 0.2), (2 + 0.0) * (0.5 + 0.4)]))
    torch.testing.assert_close(combine_scores(map_2d, map_3d, None, None, 0.1, 0.1), torch.tensor([3.0, 1.0]))


def test_loss_equals_cosine_plus_lambda_mse_on_one_rank() -> None:
    predicted, target = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # cos = [0, 1] → mean(1−cos) = 0.5; squared errors (1+4)+(0) over 4 elements = 1.25.
    assert float(direction_loss(predicted, target, torch.tensor(2.0), 0.01)) == pytest.approx(0.5 + 0.01 * 1.25)


def test_mse_scale_divides_only_the_squared_error() -> None:
    predicted, target = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    loss = direction_loss(predicted, target, torch.tensor(2.0), 0.01, mse_scale=4.0)
    assert float(loss) == pytest.approx(0.5 + 0.01 * 1.25 / 4.0)


def test_feature_mean_squares_count_foreground_only() -> None:
    mask = torch.tensor([True, True, False])
    rows_2d = torch.tensor([[1.0, 3.0], [2.0, 2.0], [100.0, 100.0]])  # per-row mean squares 5, 4 (third ignored)
    rows_3d = torch.tensor([[10.0], [0.0], [100.0]])  # 100, 0
    second = (torch.tensor([[0.0, 0.0], [3.0, 3.0], [1.0, 1.0]]), torch.tensor([[1.0], [2.0], [4.0]]), mask)
    squares = feature_mean_squares({0: (rows_2d, rows_3d, mask), 7: second})  # 2D rows: 5, 4, 0, 9; 3D: 100, 0, 1, 4
    assert squares == pytest.approx((18 / 4, 105 / 4))


def test_raw_mse_on_large_features_warns_and_rms_normalises() -> None:
    with pytest.warns(UserWarning, match="3D features are large"):
        assert mse_scales((1.0, 1000.0), "none", 0.01) == (1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mse_scales((1.0, 50.0), "none", 0.01) == (1.0, 1.0)  # λ·50 = 0.5: the paper's balance, no warning
        assert mse_scales((0.5, 1000.0), "feature_rms", 0.01) == (0.5, 1000.0)
    with pytest.raises(ValueError, match="mse_normalization"):
        UniRCMConfig(mse_normalization="l2")


def test_rms_scales_are_measured_on_the_training_store_and_saved() -> None:
    store = category(4, 0.0, seed=0)
    settings = {**TINY, "use_orq": False, "epochs": 1, "mse_normalization": "feature_rms"}
    model = UniRCM(**settings).fit_grids(store)
    assert model.mse_scale_ == pytest.approx(feature_mean_squares(store))
    loaded = UniRCM(**settings)
    loaded.load_state(model.get_config(), model.state_tensors())
    assert loaded.mse_scale_ == pytest.approx(model.mse_scale_)  # extend() after a reload trains with the same λ


def test_config_defaults_and_compat() -> None:
    default = UniRCMConfig()
    assert (default.beta_2d, default.beta_3d, default.orq_normalization) == (0.05, 0.1, "image_max")
    assert default.grid_size == 56 and default.learning_rate == 3e-4 and default.smoothing == "gaussian"
    # compat is read at scoring time; it rewrites no other hyperparameter.
    assert asdict(UniRCMConfig(compat=True)) == {**asdict(default), "compat": True}
    assert UniRCMConfig(beta_2d=0.1, orq_normalization="none").beta_2d == 0.1
    with pytest.raises(ValueError, match="branches"):
        UniRCMConfig(branches="both")
    with pytest.raises(ValueError, match="orq_normalization"):
        UniRCMConfig(orq_normalization="max")
    with pytest.raises(ValueError, match="beta_2d"):
        UniRCMConfig(beta_2d=None)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fitted() -> UniRCM:
    return UniRCM(**TINY).fit_grids(category(6, 0.0, seed=0))


def test_training_is_deterministic_and_reduces_loss(fitted: UniRCM) -> None:
    again = UniRCM(**TINY).fit_grids(category(6, 0.0, seed=0))
    first, second = fitted.state_tensors(), again.state_tensors()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert {"orq_2d.0", "orq_2d.1", "orq_3d.0", "orq_3d.1"} <= set(first)
    assert first["orq_2d.0"].shape == (8, 6) and first["orq_3d.1"].shape == (8, 4)
    assert len(fitted.loss_history_) == 4 and fitted.loss_history_[-1] < fitted.loss_history_[0]


def test_paper_literal_scoring_uses_raw_orq_norms(fitted: UniRCM) -> None:
    paper = UniRCM(**{**TINY, "orq_normalization": "none", "beta_2d": 0.1, "beta_3d": 0.1})
    paper.load_state(_config(fitted), fitted.state_tensors())
    rows_2d, rows_3d, mask = category(1, 0.0, seed=5)[0]
    maps = paper.score_grids(rows_2d, rows_3d, mask)
    assert set(maps) == {"combined", "2d", "3d", "orq_2d", "orq_3d"}
    background = ~mask.view(GRID, GRID)
    assert all(float(m[background].abs().sum()) == 0 for m in maps.values())
    expected = (maps["2d"] + 0.1 * maps["orq_2d"]) * (maps["3d"] + 0.1 * maps["orq_3d"])
    torch.testing.assert_close(maps["combined"], expected)
    # ORQ map = norm of the quantizer residual of each foreground feature.
    torch.testing.assert_close(maps["orq_3d"].flatten()[mask], fitted.orq_3d_.score(rows_3d[mask]))


def test_default_max_normalises_orq_maps(fitted: UniRCM) -> None:
    rows_2d, rows_3d, mask = category(1, 0.0, seed=5)[0]
    maps = fitted.score_grids(rows_2d, rows_3d, mask)
    assert float(maps["orq_2d"].max()) == pytest.approx(1.0) and float(maps["orq_3d"].max()) == pytest.approx(1.0)
    raw = fitted.orq_3d_.score(rows_3d[mask])
    torch.testing.assert_close(maps["orq_3d"].flatten()[mask], raw / raw.max())
    expected = (maps["2d"] + 0.05 * maps["orq_2d"]) * (maps["3d"] + 0.1 * maps["orq_3d"])
    torch.testing.assert_close(maps["combined"], expected)


def _config(model: UniRCM) -> dict:
    return {"channels": [6, 4], "loss_history": model.loss_history_, "n_train_samples": model.n_train_samples_}


def test_state_round_trip_scores_identically(fitted: UniRCM) -> None:
    loaded = UniRCM(**TINY)
    loaded.load_state(_config(fitted), fitted.state_tensors())
    sample = category(1, 0.0, seed=7)[0]
    for name, value in fitted.score_grids(*sample).items():
        torch.testing.assert_close(loaded.score_grids(*sample)[name], value)


def test_extend_learns_new_category_and_keeps_old_scores() -> None:
    old, new = category(6, 0.0, seed=0), category(6, 2.0, seed=1, offset=100)
    old_test, new_test = category(2, 0.0, seed=10), category(2, 2.0, seed=11)

    def mean_score(model: UniRCM, store: dict) -> float:
        return sum(float(model.score_grids(*g)["combined"].max()) for g in store.values()) / len(store)

    model = UniRCM(**{**TINY, "epochs": 10}).fit_grids(old)
    old_before, new_before = mean_score(model, old_test), mean_score(model, new_test)
    model.extend_grids(new, old, epochs=10)
    assert [len(b) for b in model.orq_2d_.codebooks_] == [10, 10]  # 8 + 8 // 4 codes per layer
    assert model.extensions_ == [{"new_samples": 6, "epochs": 10}] and model.n_train_samples_ == 12
    assert mean_score(model, new_test) < 0.7 * new_before
    # No forgetting: replayed old categories keep (or, trained longer, lower) their nominal scores.
    assert mean_score(model, old_test) <= 1.3 * old_before
    with pytest.raises(ValueError, match="distinct"):
        model.extend_grids(new, new, epochs=1)


def _filled(grids: dict, budget: float, spill: Path, dtype: torch.dtype = torch.float32) -> GridStore:
    store = GridStore(budget, dtype, spill)
    for index, sample in grids.items():
        store.add(index, *sample)
    return store


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_spilled_grids_read_back_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    grids = category(3, 0.5, seed=1, offset=10)
    store = _filled(grids, 0, tmp_path, dtype)
    assert store.spilled and sorted(store) == [10, 11, 12] and len(store) == 3 and 11 in store and 3 not in store
    assert len(list(tmp_path.glob("mmiad-bank-*/*.npy"))) == 6
    for index, (rows_2d, rows_3d, foreground) in grids.items():
        got_2d, got_3d, got_fg = store[index]
        assert got_2d.dtype == got_3d.dtype == dtype
        assert torch.equal(got_2d, rows_2d.to(dtype)) and torch.equal(got_3d, rows_3d.to(dtype))
        assert torch.equal(got_fg, foreground) and torch.equal(store.foreground(index), foreground)
    with pytest.raises(ValueError, match="already stored"):
        store.add(10, *grids[10])
    store.close()
    assert len(store) == 0 and list(tmp_path.glob("mmiad-bank-*")) == []


def test_budget_keeps_early_samples_in_memory(tmp_path: Path) -> None:
    grids = category(4, 0.0, seed=2)
    one_sample = sum(t.numel() * 4 for t in grids[0][:2])
    store = _filled(grids, 2 * one_sample, tmp_path)
    chunks_2d, chunks_3d = (s.chunks for s in store._stores)
    assert [isinstance(c, torch.Tensor) for c in chunks_2d] == [True, True, False, False]
    assert [isinstance(c, torch.Tensor) for c in chunks_3d] == [True, True, False, False]
    store.close()


def test_training_from_a_spilled_store_equals_training_in_memory(tmp_path: Path) -> None:
    grids = category(6, 0.0, seed=0)
    in_memory = UniRCM(**TINY).fit_grids(grids).state_tensors()
    store = _filled(grids, 0, tmp_path)
    spilled = UniRCM(**TINY).fit_grids(store).state_tensors()
    store.close()
    assert in_memory.keys() == spilled.keys() and all(torch.equal(in_memory[k], spilled[k]) for k in in_memory)


def test_orq_subsample_is_drawn_over_all_foreground_rows(tmp_path: Path) -> None:
    grids = category(3, 0.0, seed=4, offset=5)
    model = UniRCM(**{**TINY, "orq_max_points": 50})
    rows_2d, rows_3d = model._foreground_rows(_filled(grids, 0, tmp_path))
    all_2d = torch.cat([g2[fg] for g2, _, fg in grids.values()])
    all_3d = torch.cat([g3[fg] for _, g3, fg in grids.values()])
    pick = torch.randperm(len(all_2d), generator=torch.Generator().manual_seed(TINY["seed"]))[:50]
    assert torch.equal(rows_2d, all_2d[pick]) and torch.equal(rows_3d, all_3d[pick])
    every_2d, _ = UniRCM(**TINY)._foreground_rows(grids)
    assert torch.equal(every_2d, all_2d)
