"""The incremental unified protocol: settings, class order, forgetting by hand, and a tiny run with GLFM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmiad.bench.incremental import (
    EYECANDIES_ORDER,
    MVTEC3D_ORDER,
    Setting,
    flipped,
    forgetting,
    markdown,
    plan_steps,
    run_protocol,
)


def test_ib_iumad_settings_and_orders() -> None:
    shuffled = sorted(MVTEC3D_ORDER, reverse=True)
    assert plan_steps(Setting.parse("10-0"), shuffled) == [list(MVTEC3D_ORDER)]
    assert plan_steps(Setting.parse("9-1"), shuffled) == [list(MVTEC3D_ORDER[:9]), ["tire"]]
    assert plan_steps(Setting.parse("6-4"), shuffled) == [list(MVTEC3D_ORDER[:6]), ["peach", "potato", "rope", "tire"]]
    six_one = plan_steps(Setting.parse("6-1x4"), shuffled)
    assert six_one == [list(MVTEC3D_ORDER[:6]), ["peach"], ["potato"], ["rope"], ["tire"]]
    eyecandies = plan_steps(Setting.parse("6-1×4"), sorted(EYECANDIES_ORDER))
    assert eyecandies[0][-1] == "HazelnutTruffle" and [s[0] for s in eyecandies[1:]] == list(EYECANDIES_ORDER[6:])
    assert plan_steps(Setting.parse("2-1"), ["c", "a", "b"]) == [["a", "b"], ["c"]]  # other data: alphabetical
    with pytest.raises(ValueError, match="needs 4 classes"):
        plan_steps(Setting.parse("2-1x2"), ["a", "b", "c"])
    for bad in ("10", "6-0x2", "0-1", "a-b"):
        with pytest.raises(ValueError):
            Setting.parse(bad)


def test_forgetting_by_hand() -> None:
    """Three steps; classes a, b before the last step, c only at the end.

    a: 0.90 → 0.95 → 0.80, best earlier 0.95, drop 0.15. b: 0.70 (step 1) → 0.75, drop −0.05 (the final model is
    better). c is new at the last step and does not count. Mean (0.15 − 0.05) / 2 = 0.05.
    """
    history = [{"a": 0.90}, {"a": 0.95, "b": 0.70}, {"a": 0.80, "b": 0.75, "c": 0.60}]
    assert forgetting(history) == pytest.approx(0.05)
    assert forgetting(history[:1]) is None
    assert flipped(0.3) == pytest.approx(0.7) and flipped(0.6) == 0.6


@pytest.mark.slow
def test_tiny_run_resumes_and_reports(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmiad.methods.glfm import GLFM

    replayed: list[int] = []
    original = GLFM.extend

    def spy(self: GLFM, new: list, replay: list, **kwargs: object) -> GLFM:
        replayed.append(len(replay))
        return original(self, new, replay, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(GLFM, "extend", spy)

    hparams = {"glfm": {**GLFM.tiny_hparams, "adaptation": "none", "prototypes": 1}}
    out = tmp_path / "inc"
    state = run_protocol(tiny_dataset, ["glfm", "btf"], "1-1", out, hparams=hparams, cache_dir=str(tmp_path / "cache"))
    assert "no extend" in state["methods"]["btf"]["refused"]  # BTF cannot grow: listed, the others still run
    record = state["methods"]["glfm"]
    assert replayed == [0]  # a step trains on its new classes only
    assert [s["seen"] for s in record["steps"]] == [["block"], ["block", "puck"]]
    first, last = (s["image_auroc"] for s in record["steps"])
    assert record["forgetting"]["image_auroc"] == pytest.approx(first["block"] - last["block"])
    assert (out / "glfm" / "step-0" / "unified.safetensors").is_file()
    assert (out / "glfm" / "step-1" / "run.json").is_file()
    assert json.loads((out / "glfm" / "step-1" / "run.json").read_text())["categories"] == ["block", "puck"]
    saved = json.loads((out / "incremental.json").read_text())
    assert saved["methods"]["glfm"]["forgetting"] == record["forgetting"]
    assert "| glfm | 1 | 2 |" in (out / "incremental.md").read_text()
    # Resuming a finished run trains nothing and gives the same results.
    (out / "glfm" / "from-scratch").rename(tmp_path / "moved")  # would be retrained if the state were lost
    again = run_protocol(tiny_dataset, ["glfm"], "1-1", out, hparams=hparams, cache_dir=str(tmp_path / "cache"))
    assert again["methods"]["glfm"] == record
    assert not (out / "glfm" / "from-scratch").exists()
    assert markdown(again, "1-1", again["steps"]).count("| glfm |") == 3
    assert "| btf | cannot add categories" in markdown(again, "1-1", again["steps"])
