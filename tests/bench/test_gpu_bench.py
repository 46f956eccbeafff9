"""``python -m mmiad.bench gpu``: the comparison flags real disagreements, the CLI refuses an absent device loudly,
and a run of one method against itself agrees exactly and writes a well-formed table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmiad.bench.__main__ import main
from mmiad.bench.gpu import (
    EXIT_DISAGREE,
    EXIT_NO_DEVICE,
    METRICS,
    TOLERANCES,
    compare_outputs,
    scaled_error,
    tolerance_for,
)


def _side(scores: np.ndarray, maps: np.ndarray, metrics: dict[str, float] | None = None) -> dict:
    metrics = metrics if metrics is not None else dict.fromkeys(METRICS, 0.75)
    return {"scores": scores, "maps": maps, "metrics": metrics, "stems": [f"s{i}" for i in range(len(scores))]}


@pytest.fixture
def reference() -> dict:
    rng = np.random.default_rng(0)
    return _side(rng.uniform(1.0, 3.0, 12), rng.uniform(0.0, 2.0, (12, 8, 8)).astype(np.float32))


def test_scaled_error_is_the_max_difference_over_the_max_magnitude() -> None:
    reference = np.array([1.0, -4.0, 2.0])
    target = np.array([1.0, -4.0, 2.5])
    assert scaled_error(reference, target) == pytest.approx(0.5 / 4.0)
    assert scaled_error(reference, reference.copy()) == 0.0
    # NaN at the same place on both sides is agreement; NaN on one side only, or another shape, is not.
    assert scaled_error(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])) == 0.0
    assert scaled_error(np.array([0.5, 1.0]), np.array([np.nan, 1.0])) == math.inf
    assert scaled_error(reference, reference[:2]) == math.inf


def test_fp32_tolerance_passes_reduction_order_noise_and_flags_more(reference: dict) -> None:
    tolerance = tolerance_for("fp32", "fp32")
    scale = np.abs(reference["scores"]).max()
    noisy = _side(reference["scores"] + 1e-6 * scale, reference["maps"] * (1 + 1e-6), reference["metrics"])
    assert compare_outputs(reference, noisy, tolerance).ok

    # One sample's score off by 1e-3 of the scale: ten times the fp32 tolerance.
    scores = reference["scores"].copy()
    scores[5] += 1e-3 * scale
    agreement = compare_outputs(reference, _side(scores, reference["maps"], reference["metrics"]), tolerance)
    assert not agreement.ok and agreement.score_error == pytest.approx(1e-3, rel=1e-6)
    assert len(agreement.problems) == 1 and "image scores" in agreement.problems[0]

    # One pixel of one map off (a CUDA-only bug in one kernel would look like this).
    maps = reference["maps"].copy()
    maps[3, 2, 7] += 0.01
    agreement = compare_outputs(reference, _side(reference["scores"], maps, reference["metrics"]), tolerance)
    assert not agreement.ok and "anomaly maps" in agreement.problems[0]
    assert agreement.map_error == pytest.approx(0.01 / np.abs(reference["maps"]).max(), rel=1e-4)


def test_metrics_and_sample_order_are_compared(reference: dict) -> None:
    tolerance = tolerance_for("fp32", "fp32")
    metrics = {**reference["metrics"], "aupro@0.3": 0.70}
    agreement = compare_outputs(reference, _side(reference["scores"], reference["maps"], metrics), tolerance)
    assert not agreement.ok and agreement.metric_errors["aupro@0.3"] == pytest.approx(0.05)
    assert agreement.metric_errors["image_auroc"] == 0.0
    # An undefined metric on both sides agrees; on one side only it does not.
    both = {**reference["metrics"], "pixel_auroc": math.nan}
    assert compare_outputs(
        _side(reference["scores"], reference["maps"], both),
        _side(reference["scores"], reference["maps"], dict(both)),
        tolerance,
    ).ok
    assert not compare_outputs(reference, _side(reference["scores"], reference["maps"], both), tolerance).ok
    swapped = dict(reference, stems=list(reversed(reference["stems"])))
    assert any("different samples" in p for p in compare_outputs(reference, swapped, tolerance).problems)


def test_bf16_is_judged_by_the_looser_tolerance(reference: dict) -> None:
    assert tolerance_for("fp32", "bf16") == tolerance_for("bf16", "fp32") == TOLERANCES["bf16"]
    assert TOLERANCES["fp32"].score < TOLERANCES["fp16"].score < TOLERANCES["bf16"].score
    # bf16-sized rounding (unit roundoff 2^-8 relative, per element) passes bf16 and fails fp32.
    rng = np.random.default_rng(1)
    rounded = reference["scores"] * (1 + rng.uniform(-(2**-8), 2**-8, reference["scores"].shape))
    side = _side(rounded, reference["maps"], reference["metrics"])
    assert compare_outputs(reference, side, tolerance_for("fp32", "bf16")).ok
    assert not compare_outputs(reference, side, tolerance_for("fp32", "fp32")).ok
    # A 10 % error in one score fails even bf16.
    scores = reference["scores"].copy()
    scores[np.argmax(scores)] *= 1.1
    assert not compare_outputs(reference, _side(scores, reference["maps"]), tolerance_for("fp32", "bf16")).ok


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the absent-device path cannot be exercised")
def test_absent_cuda_target_exits_distinctly_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "BENCHMARKS.md"
    code = main(["gpu", "--target-device", "cuda", "--out", str(out), "--work", str(tmp_path / "work")])
    captured = capsys.readouterr()
    assert code == EXIT_NO_DEVICE and code not in (0, EXIT_DISAGREE)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("CUDA is untested here") and "'cuda'" in lines[0]
    assert captured.out == "" and not out.exists() and not (tmp_path / "work").exists()  # nothing was run


def test_one_method_against_itself_agrees_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept\n")
    argv = ["gpu", "--target-device", "cpu", "--methods", "cfm", "--presets", "weightfree", "--train", "2"]
    argv += ["--test-good", "2", "--per-defect", "1", "--out", str(out), "--work", str(tmp_path / "work")]
    assert main([*argv, "--note", "Measured by the test."]) == 0
    capsys.readouterr()
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    section = text.split("<!-- bench:gpu-cpu-fp32-vs-cpu-fp32 -->", 1)[1].split(
        "<!-- /bench:gpu-cpu-fp32-vs-cpu-fp32", 1
    )[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert "All 1 agree." in section and section.rstrip().endswith("Measured by the test.")
    header, cells = rows[0], [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]
    assert len(rows) == 4 and all(row.count("|") == header.count("|") for row in rows)
    reference, target = cells
    assert reference[:3] == ["cfm", "weightfree", "reference: cpu fp32"]
    assert target[:3] == ["cfm", "weightfree", "target: cpu fp32"]
    # Same device and precision, same seeds: bit-identical scores, maps and metrics.
    assert reference[3:7] == target[3:7] and target[10:] == ["0.0e+00", "0.0e+00", "yes"]
    assert reference[8] == target[8] == "—"  # no GPU memory on a CPU side
    with (
        np.load(tmp_path / "work" / "cfm-weightfree-reference.npz") as a,
        np.load(tmp_path / "work" / "cfm-weightfree-target.npz") as b,
    ):
        assert a["scores"].shape == (6,) and np.array_equal(a["scores"], b["scores"])
        assert np.array_equal(a["maps"], b["maps"]) and a["maps"].std() > 0


def test_a_target_only_disagreement_or_failure_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The CLI's wiring, with the child processes replaced by synthetic sides: one method whose target drifts,
    one whose target crashes (as a CUDA-only failure would), one that agrees."""
    import mmiad.bench.gpu as bench

    rng = np.random.default_rng(2)
    scores, maps = rng.uniform(1, 2, 6), rng.uniform(0, 1, (6, 4, 4))

    def fake_side(spec: dict) -> dict:
        side = {"spec": spec, **_side(scores.copy(), maps.copy()), "samples_per_s": 1.0, "rss_peak_mb": 10.0}
        side["gpu_peak_mb"] = None
        if spec["device"] == "cpu" and spec["precision"] == "bf16":  # the target
            if spec["method"] == "cfm":
                side["scores"][2] += 0.5  # a quarter of the scale: beyond even bf16's tolerance
            elif spec["method"] == "btf":
                return {"spec": spec, "error": "RuntimeError: CUDA error: an illegal memory access"}
        return side

    monkeypatch.setattr(bench, "measure_side", fake_side)
    out = tmp_path / "B.md"
    argv = ["gpu", "--target-device", "cpu", "--target-precision", "bf16", "--methods", "btf,cfm,m3dm"]
    argv += ["--presets", "weightfree", "--train", "1", "--test-good", "1", "--per-defect", "1", "--out", str(out)]
    assert main(argv) == EXIT_DISAGREE
    err = capsys.readouterr().err
    assert "DISAGREE cfm weightfree: image scores differ" in err
    assert "DISAGREE btf weightfree: target failed: RuntimeError: CUDA error" in err
    assert "DISAGREE m3dm" not in err
    text = out.read_text()
    assert "**2 of 3 disagree.**" in text
    verdicts = [line.rstrip("| ").rsplit("|", 1)[1].strip() for line in text.splitlines() if "| target:" in line]
    assert verdicts == ["**no**", "**no**", "yes"]
