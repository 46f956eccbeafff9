"""GLFM's global/local memories: prototype choice, routing and routed 1-NN scores against brute force."""

from __future__ import annotations

import numpy as np
import torch

from mmiad.features.base import PointFeatures
from mmiad.methods.glfm import GLFM
from mmiad.methods.glfm.banks import coreset_bank, more_prototypes, route, select_prototypes

CPU = torch.device("cpu")


def test_prototypes_start_at_cloud_zero_and_take_every_cloud_when_few() -> None:
    globals_ = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    picked = select_prototypes(globals_, 4, eps=0.9, seed=0, device=CPU)
    assert picked[0] == 0 and len(set(picked.tolist())) == 4
    assert select_prototypes(globals_[:3], 4, eps=0.9, seed=0, device=CPU).tolist() == [0, 1, 2]


def test_routing_is_nearest_prototype_with_ties_to_the_first() -> None:
    prototypes = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    clouds = torch.tensor([[1.0, 0.0], [1.9, 0.1], [0.1, 2.0], [-1.0, -1.0]])
    assert route(clouds, prototypes).tolist() == [0, 1, 2, 0]  # [1,0] is tied between 0 and 1


def test_more_prototypes_are_farthest_first_from_the_held_ones() -> None:
    existing = torch.tensor([[0.0, 0.0]])
    candidates = torch.tensor([[1.0, 0.0], [10.0, 0.0], [9.0, 0.0], [0.0, 5.0]])
    assert more_prototypes(existing, candidates, 2).tolist() == [1, 3]


def test_coreset_bank_keeps_a_tenth_of_real_rows() -> None:
    chunks = [torch.randn(40, 6, generator=torch.Generator().manual_seed(i)).half() for i in range(3)]
    bank = coreset_bank(chunks, 0.1, eps=0.9, seed=0, device=CPU)
    every = torch.cat(chunks).float()
    assert bank.shape == (12, 6)
    assert all(bool((every == row).all(dim=1).any()) for row in bank)
    torch.testing.assert_close(bank[0], every[0])  # the greedy selection starts at row 0


def test_coreset_bank_of_spilled_chunks_equals_the_in_memory_one(tmp_path) -> None:
    """Past ``memory_budget_gb`` the clouds' features are memory-mapped spill files: the same memory results."""
    from mmiad.methods.memorybank.bank import PatchStore

    chunks = [torch.randn(30 + 7 * i, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    in_memory, spilled = PatchStore(1e9), PatchStore(0, tmp_path)
    for chunk in chunks:
        in_memory.append(chunk)
        spilled.append(chunk)
    assert spilled.spilled and not in_memory.spilled
    assert all(isinstance(c, np.ndarray) for c in spilled.chunks)
    expected = coreset_bank(in_memory.chunks, 0.1, eps=0.9, seed=3, device=CPU)
    torch.testing.assert_close(coreset_bank(spilled.chunks, 0.1, eps=0.9, seed=3, device=CPU), expected, rtol=0, atol=0)
    torch.testing.assert_close(coreset_bank(spilled.chunks, 1.0, eps=0.9, seed=3, device=CPU), torch.cat(chunks))
    every = torch.cat(chunks)
    assert all(bool((every == row).all(dim=1).any()) for row in expected)  # real rows, in float32
    spilled.close()
    assert not list(tmp_path.iterdir())  # the spill files are deleted with the store


def _fitted(prototypes: torch.Tensor, banks: list[torch.Tensor]) -> GLFM:
    model = GLFM(device="cpu")
    model.prototypes_, model.banks_ = prototypes, banks
    model.fitted_ = True
    return model


def test_routed_one_nn_scores_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    banks = [torch.from_numpy(rng.normal(loc=m, size=(15, 4)).astype(np.float32)) for m in (0.0, 5.0)]
    model = _fitted(torch.stack([b.mean(0) for b in banks]), banks)
    local = torch.from_numpy(rng.normal(loc=5.0, size=(6, 4)).astype(np.float32))
    points = PointFeatures(local, torch.arange(6), torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1), 3)
    scores, owner = model.score_cloud(points)
    assert owner == 1
    expected = [min(np.linalg.norm(q - m) for m in banks[1].double().numpy()) for q in local.double().numpy()]
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


def test_a_training_cloud_scores_zero_against_an_uncut_single_memory() -> None:
    """Sheet §6.7: K = 1 and no coreset cut, a training cloud against its own memory scores ≈ 0 everywhere."""
    local = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    model = _fitted(local.mean(0, keepdim=True), [local.clone()])
    points = PointFeatures(local, torch.arange(20), torch.zeros(20, 1, dtype=torch.long), torch.ones(20, 1), 5)
    scores, _ = model.score_cloud(points)
    assert float(scores.abs().max()) < 1e-3


def test_growing_keeps_old_memories_and_routes_new_clouds() -> None:
    """``extend``'s memory step: old rows stay first and unchanged, new clouds join their nearest prototype."""
    old = [torch.zeros(3, 2), torch.full((2, 2), 5.0)]
    model = _fitted(torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 9.0]]), old)
    near_third = torch.tensor([[0.0, 9.0], [0.1, 9.1]])
    near_first = torch.tensor([[0.2, 0.0]])
    model.config.coreset_fraction = 1.0
    grown = model._grown_banks(old, [near_third, near_first], [near_third.mean(0), near_first.mean(0)], 1)
    torch.testing.assert_close(grown[0], torch.cat([old[0], near_first]))
    torch.testing.assert_close(grown[1], old[1])
    torch.testing.assert_close(grown[2], near_third)


def test_fit_with_every_cloud_spilled_builds_the_same_memories(tiny_dataset, tmp_path, monkeypatch) -> None:
    from mmiad.data.mvtec3d import list_records
    from mmiad.methods.memorybank.bank import PatchStore

    was_spilled: list[bool] = []
    close = PatchStore.close

    def recording_close(store: PatchStore) -> None:
        was_spilled.append(store.spilled)
        close(store)

    monkeypatch.setattr(PatchStore, "close", recording_close)

    hparams = {**GLFM.tiny_hparams, "adaptation": "none", "prototypes": 2}
    records = list_records(tiny_dataset, "block", "train")
    in_memory = GLFM(cache_dir=str(tmp_path / "a"), **hparams).fit(records)
    spilled = GLFM(cache_dir=str(tmp_path / "b"), memory_budget_gb=0, **hparams).fit(records)
    assert len(in_memory.banks_) == len(spilled.banks_) == 2
    for expected, found in zip(in_memory.banks_, spilled.banks_, strict=True):
        torch.testing.assert_close(found, expected, rtol=0, atol=0)
    assert was_spilled == [False, True]  # the default budget holds the tiny clouds; a zero budget spills them all
    assert not list((tmp_path / "b" / "spill").iterdir())  # and the spill files are gone
