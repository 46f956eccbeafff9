"""Importing the authors' released CFM checkpoints (``CFM_2Dto3D_<class>_<E>ep_<B>bs.pth`` pairs).

The files are written here as ``torch.save`` of plain state dicts with the official ``FeatureProjectionMLP`` names
(``input``, ``projection``, ``output``; ``models/feature_transfer_nets.py``), and the imported model's maps are
checked against a functional re-derivation of the official forward and scoring, written with plain torch ops on
those state dicts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmiad.data.mvtec3d import list_records
from mmiad.engine import load_trained, predict_records
from mmiad.engine.imports import import_run
from mmiad.features.checkpoints import CheckpointError
from mmiad.methods.cfm.scoring import finalize_map
from mmiad.postprocess.threshold import calibrate

SMALL = {"extractors": "weightfree", "image_size": 64, "grid_size": 32}
C2, C3 = 42, 33  # weight-free 2D and 3D channels


def official_mlp_state(generator: torch.Generator, c_in: int, c_out: int) -> dict[str, torch.Tensor]:
    """A ``FeatureProjectionMLP(c_in, c_out)`` state dict: hidden width (in + out) // 2."""
    hidden = (c_in + c_out) // 2
    state = {}
    for name, (rows, cols) in {
        "input": (hidden, c_in),
        "projection": (hidden, hidden),
        "output": (c_out, hidden),
    }.items():
        state[f"{name}.weight"] = torch.randn(rows, cols, generator=generator) / cols**0.5
        state[f"{name}.bias"] = torch.randn(rows, generator=generator) * 0.1
    return state


def official_mlp_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """input → GELU → projection → GELU → output, as ``FeatureProjectionMLP.forward``."""
    x = F.gelu(x @ state["input.weight"].T + state["input.bias"])
    x = F.gelu(x @ state["projection.weight"].T + state["projection.bias"])
    return x @ state["output.weight"].T + state["output.bias"]


def write_release(root: Path, classes: list[str], *, per_class_folders: bool = True, seed: int = 0) -> dict:
    """The README's download: one folder per class with the two direction files (or all files in one folder)."""
    generator = torch.Generator().manual_seed(seed)
    states = {}
    for name in classes:
        folder = root / name if per_class_folders else root
        folder.mkdir(parents=True, exist_ok=True)
        states[name] = {
            "2Dto3D": official_mlp_state(generator, C2, C3),
            "3Dto2D": official_mlp_state(generator, C3, C2),
        }
        for direction, state in states[name].items():
            torch.save(state, folder / f"CFM_{direction}_{name}_250ep_4bs.pth")
    return states


def reference_maps(states: dict, rows_2d: torch.Tensor, rows_3d: torch.Tensor, foreground: torch.Tensor):
    """The official scoring: distance of L2-normalised predicted and observed features, zero off the foreground,
    multiplied across the two directions (``cfm_inference.py``)."""
    predicted_3d = official_mlp_forward(states["2Dto3D"], rows_2d)
    predicted_2d = official_mlp_forward(states["3Dto2D"], rows_3d)
    d3 = (F.normalize(predicted_3d, dim=-1) - F.normalize(rows_3d, dim=-1)).pow(2).sum(-1).sqrt() * foreground
    d2 = (F.normalize(predicted_2d, dim=-1) - F.normalize(rows_2d, dim=-1)).pow(2).sum(-1).sqrt() * foreground
    return d2 * d3, d2, d3


def test_imported_cfm_maps_equal_the_official_forward_and_thresholds_are_calibrated(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    states = write_release(tmp_path / "release", ["puck", "block"])
    cache = str(tmp_path / "cache")
    files, _ = import_run(
        "cfm",
        tmp_path / "release",
        tmp_path / "run",
        data_root=tiny_dataset,
        categories=["puck"],
        hparams=SMALL,
        cache_dir=cache,
    )
    assert list(files) == ["puck"]
    trained = load_trained(files["puck"], cache_dir=cache)
    model = trained.model
    for record in list_records(tiny_dataset, "puck", "test")[:2]:
        _, features = next(model.pipeline.iter_features(model.pipeline.preprocess([record])))  # as predict does
        grid_2d, grid_3d, foreground = features.on_grid(32)
        rows_2d, rows_3d = grid_2d.flatten(1).T, grid_3d.flatten(1).T
        expected = reference_maps(states["puck"], rows_2d, rows_3d, foreground.flatten().float())
        got = model.score_features(features)
        for mine, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(mine.flatten(), theirs, rtol=1e-5, atol=1e-6)
        assert float(expected[0].max()) > 0
        # The final map of predict is the shared post-processing of exactly these maps.
        final = finalize_map(
            expected[0].view(32, 32),
            out_size=64,
            smoothing=model.settings.smoothing,
            sigma=model.config.sigma,
            compat=False,
        )
        prediction = next(model.predict([record]))
        torch.testing.assert_close(torch.from_numpy(prediction.anomaly_map), final.anomaly_map, rtol=1e-5, atol=1e-6)
    # Thresholds are what training's calibration gives on the validation split.
    validation = list_records(tiny_dataset, "puck", "validation")
    held_out = list(model.predict(validation))
    expected_thresholds = calibrate(
        [p.pred_score for p in held_out], [p.anomaly_map for p in held_out], 0.01, "validation"
    )
    assert trained.thresholds == expected_thresholds
    assert trained.fallback is not None and trained.info["category"] == "puck"


def test_flat_folder_without_data_gives_a_run_without_thresholds(tiny_dataset: Path, tmp_path: Path) -> None:
    write_release(tmp_path / "flat", ["puck", "block"], per_class_folders=False)
    cache = str(tmp_path / "cache")
    files, _ = import_run(
        "cfm", tmp_path / "flat", tmp_path / "run", categories=["block"], hparams=SMALL, cache_dir=cache
    )
    assert list(files) == ["block"]
    trained = load_trained(files["block"], cache_dir=cache)
    assert trained.thresholds is None and trained.fallback is None
    prediction = next(predict_records(trained, list_records(tiny_dataset, "block", "test")[:1]))
    assert prediction.pred_label is None and prediction.pred_mask is None and prediction.pred_score > 0


def _break(release: Path, how: str) -> Path:
    """Damage the puck 2D→3D file of a valid release in one way; returns the damaged file."""
    path = release / "puck" / "CFM_2Dto3D_puck_250ep_4bs.pth"
    state = torch.load(path, weights_only=True)
    if how == "wrong kind":
        state = {"xyz_norm.weight": torch.ones(C3), "xyz_norm.bias": torch.zeros(C3)}  # an M3DM UFF piece
    elif how == "missing key":
        del state["projection.bias"]
    elif how == "extra key":
        state["act_fcn.weight"] = torch.ones(3)
    elif how == "wrong shape":
        state["projection.weight"] = state["projection.weight"][:, :-1]
    elif how == "not weights-only":
        state["note"] = os.stat_result((0,) * 10)  # a Python object weights_only refuses
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("wrong kind", r"not a CFM FeatureProjectionMLP file; missing keys \(2\): input.weight, output.weight"),
        ("missing key", r"missing keys \(1\): projection.bias"),
        ("extra key", r"unexpected keys \(1\): act_fcn.weight"),
        ("wrong shape", r"shape mismatches \(1\): projection.weight: \(37, 36\) vs \(37, 37\)"),
        ("not weights-only", r"refusing to unpickle Python objects"),
    ],
)
def test_bad_files_give_one_error_naming_the_file_and_leave_nothing(tmp_path: Path, how: str, expected: str) -> None:
    write_release(tmp_path / "release", ["puck"])
    bad = _break(tmp_path / "release", how)
    with pytest.raises(CheckpointError, match=expected) as error:
        import_run("cfm", tmp_path / "release", tmp_path / "run", hparams=SMALL, cache_dir=str(tmp_path / "cache"))
    assert str(error.value).startswith(str(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # no run, no temporary folder


def test_class_names_must_be_plain_and_pairs_complete(tmp_path: Path) -> None:
    release = tmp_path / "release"
    write_release(release, ["puck"])
    (release / "puck" / "CFM_2Dto3D_puck_250ep_4bs.pth").rename(release / "puck" / "CFM_2Dto3D_a..b_250ep_4bs.pth")
    with pytest.raises(CheckpointError, match="not a plain category name"):
        import_run("cfm", release, tmp_path / "run", hparams=SMALL)
    (release / "puck" / "CFM_2Dto3D_a..b_250ep_4bs.pth").unlink()
    with pytest.raises(CheckpointError, match=r"without both directions: puck \(only 3Dto2D\)"):
        import_run("cfm", release, tmp_path / "run", hparams=SMALL)
    assert not (tmp_path / "run").exists()


def test_extractors_must_give_the_released_channels(tmp_path: Path) -> None:
    write_release(tmp_path / "release", ["puck"])
    with pytest.warns(UserWarning, match="RANDOM weights"), pytest.raises(ValueError, match="768 and 1152"):
        import_run(
            "cfm",
            tmp_path / "release",
            tmp_path / "run",
            hparams={"random_init": True, "image_size": 64, "grid_size": 32},
            cache_dir=str(tmp_path / "cache"),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
