"""One few-shot protocol for every method: the draw (random: seeded; first: sorted) and what a run records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained, select_few_shot, train_run

TINY_CFM = {"image_size": 64, "grid_size": 32, "epochs": 1, "batch_size": 2}


def test_first_takes_the_first_k_files_in_sorted_order(tiny_dataset: Path) -> None:
    records = list_records(tiny_dataset, "puck", "train")
    shuffled = list(records)
    random.Random(3).shuffle(shuffled)
    chosen, indices = select_few_shot(shuffled, 2, seed=99, selection="first")
    assert [r.rgb_path for r in chosen] == sorted(r.rgb_path for r in records)[:2]
    assert indices == sorted(indices) and [shuffled[i] for i in indices] == chosen
    assert select_few_shot(shuffled, 2, seed=0, selection="first") == (chosen, indices)  # the seed plays no part


def test_random_is_numpy_seeded_and_k_beyond_the_split_keeps_all(tiny_dataset: Path) -> None:
    records = list_records(tiny_dataset, "puck", "train")
    chosen, indices = select_few_shot(records, 2, seed=5)
    expected = sorted(np.random.default_rng(5).choice(len(records), size=2, replace=False).tolist())
    assert indices == expected and chosen == [records[i] for i in expected]
    assert select_few_shot(records, 2, seed=5) == (chosen, indices)
    assert select_few_shot(records, len(records) + 3, seed=5)[1] == list(range(len(records)))
    with pytest.raises(ValueError, match="shot selection"):
        select_few_shot(records, 2, seed=5, selection="best")
    with pytest.raises(ValueError, match="positive"):
        select_few_shot(records, 0, seed=5)


@pytest.mark.parametrize("selection", ["random", "first"])
def test_every_method_trains_on_the_same_recorded_files(tiny_dataset: Path, tmp_path: Path, selection: str) -> None:
    cache = str(tmp_path / "cache")
    draws = {}
    for method, hparams in (("rad", {"image_size": 64, "k_image": 2, "map_size": 64}), ("cfm", TINY_CFM)):
        run = tmp_path / method
        files, _ = train_run(
            method,
            tiny_dataset,
            run,
            categories=["puck"],
            shots=2,
            seed=7,
            shot_selection=selection,
            hparams=hparams,
            cache_dir=cache,
            fallback=False,
        )
        recorded = json.loads((run / "run.json").read_text())["few_shot"]["puck"]
        assert load_trained(files["puck"], cache_dir=cache).info["few_shot"] == recorded
        draws[method] = recorded
    assert draws["rad"] == draws["cfm"]
    records = list_records(tiny_dataset, "puck", "train")
    expected, indices = select_few_shot(records, 2, seed=7, selection=selection)
    record = draws["rad"]
    assert record["indices"] == indices and record["selection"] == selection
    assert record["seed"] == (7 if selection == "random" else None)
    assert record["files"] == [r.rgb_path.relative_to(tiny_dataset).as_posix() for r in expected]
