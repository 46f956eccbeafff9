"""CIF's memory: id alignment across shots, the 10 %-of-all-patches rule and the per-cluster coreset."""

from __future__ import annotations

import numpy as np
import torch

from mmiad.methods.cif.memory import (
    ClusterBank,
    cluster_allocation,
    cluster_means,
    minimax_centre,
    sample_per_cluster,
    sampling_rate,
)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T) / (np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None, :])


def test_later_shots_are_relabelled_by_hyperedge_similarity_and_clusters_become_means() -> None:
    rng = np.random.default_rng(0)
    first_x, second_x = rng.normal(size=(10, 4)), rng.normal(size=(8, 4))
    first_h = np.zeros((10, 3))
    first_h[np.arange(10), rng.integers(0, 3, 10)] = 1
    first_h[0, 2] = 1  # two memberships: the hard id is the lower one
    first_h[9] = 0  # background: not stored
    second_h = np.zeros((8, 3))
    second_h[np.arange(8), [0, 1, 2, 0, 1, 2, 2, 2]] = 1
    first_e, second_e = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    bank = ClusterBank(3)
    bank.add(torch.from_numpy(first_x), torch.from_numpy(first_h), torch.from_numpy(first_e))
    np.testing.assert_array_equal(bank.edges.numpy(), first_e)  # the first shot's X_E
    bank.add(torch.from_numpy(second_x), torch.from_numpy(second_h), torch.from_numpy(second_e))
    rows, ids = bank.all()
    first_ids = [int(np.flatnonzero(row)[0]) for row in first_h[:9]]
    matched = _cosine(second_e, first_e).argmax(axis=1)
    second_ids = [int(matched[np.flatnonzero(row)[0]]) for row in second_h]
    assert ids.tolist() == first_ids + second_ids
    np.testing.assert_array_equal(rows.numpy(), np.vstack([first_x[:9], second_x]))
    for cluster in range(3):  # plain member means after the second shot (zero for an emptied cluster)
        members = rows.numpy()[ids.numpy() == cluster]
        expected = members.mean(axis=0) if len(members) else np.zeros(4)
        np.testing.assert_allclose(bank.edges[cluster].numpy(), expected, atol=1e-12)


def test_the_keep_rate_counts_all_patches_of_the_shots() -> None:
    # 1 shot, 28×28, 300 foreground nodes: 78.4 of 300 are kept (10 % of 784, not of 300); capped at 1.
    assert sampling_rate(0.1, 1, 784, 300) == 78.4 / 300
    assert sampling_rate(0.1, 4, 784, 200) == 1.0
    ids = torch.tensor([0] * 150 + [1] * 90 + [2] * 60)
    allocation = cluster_allocation(ids, 4, 78.4 / 300)
    assert allocation == {0: round(150 / 300 * 78), 1: round(90 / 300 * 78), 2: round(60 / 300 * 78)}
    assert abs(sum(allocation.values()) - 78) <= 3  # 78 ± the number of clusters
    tiny = cluster_allocation(torch.tensor([0] * 200 + [3]), 4, 0.05)
    assert tiny[3] == 1 and 1 not in tiny and 2 not in tiny  # every non-empty cluster keeps one, empty ones none


def test_minimax_centre_is_the_brute_force_one() -> None:
    rng = np.random.default_rng(1)
    points = rng.normal(size=(15, 3))
    worst = [max(np.linalg.norm(p - q) for q in points) for p in points]
    assert minimax_centre(torch.from_numpy(points)) == int(np.argmin(worst))


def test_sampling_runs_inside_each_cluster() -> None:
    rng = np.random.default_rng(2)
    ids = torch.from_numpy(rng.choice([0, 1, 3], size=120, p=[0.6, 0.35, 0.05]))
    rows = torch.from_numpy(rng.normal(size=(120, 5)).astype(np.float32)) + 10 * ids.unsqueeze(1)
    rate = sampling_rate(0.1, 1, 300, 120)
    kept = sample_per_cluster(rows, ids, 4, rate)
    allocation = cluster_allocation(ids, 4, rate)
    counts = torch.bincount(ids[kept], minlength=4).tolist()
    assert counts == [allocation.get(c, 0) for c in range(4)]
    single = allocation[3] == 1
    if single:  # a one-node allocation keeps the cluster's minimax centre
        members = torch.nonzero(ids == 3, as_tuple=True)[0]
        assert int(kept[ids[kept] == 3][0]) == int(members[minimax_centre(rows[members])])
    means, present = cluster_means(rows[kept], ids[kept], 4)
    assert present.tolist() == [True, True, False, True] and not means[2].any()
