"""Hyperparameters on the command line: typed from each method's config, one line and exit 2 when wrong, per-method
help, and ``--set``/``--extractors`` with ``--run`` applied (inference-time keys) or refused, never ignored."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmiad.cli.main import build_parser, main
from mmiad.cli.train_command import _hparams
from mmiad.engine import RunModels, input_records
from mmiad.engine.trained import load_trained
from mmiad.methods.hparams import HparamError

TINY = ["--epochs", "1", "--image-size", "64", "--grid-size", "32"]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command prints (progress bars aside, there is nothing else on stderr)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "epochs=1.5"], "epochs=1.5 is not valid for cfm: expected an integer"),
        (["--epochs", "1.5"], "epochs=1.5 is not valid for cfm: expected an integer"),
        (["--set", "seed={}"], "seed={} is not valid for cfm: expected an integer"),
        (["--set", "learning_rate=abc"], "learning_rate=abc is not valid for cfm: expected a finite number"),
        (["--lr", "abc"], "learning_rate=abc is not valid for cfm: expected a finite number"),
        (["--set", "grid_size=0"], "grid_size=0 is not valid for cfm: must be in [1, image_size=224]"),
        (["--grid-size", "-3"], "grid_size=-3 is not valid for cfm: must be in [1, image_size=224]"),
        (["--method", "unircm", "--set", "hidden=0"], "hidden=0 is not valid for unircm: must be at least 1"),
        (["--method", "unircm", "--use-orq", "no"], "use_orq=no is not valid for unircm: expected true or false"),
        (["--set", "compat=maybe"], "compat=maybe is not valid for cfm: expected true or false"),
        (["--set", "no_such_key=1"], "no_such_key is not a hyperparameter of cfm; valid keys: aggregation, batch_size"),
        (["--method", "btf", "--epochs", "3"], "epochs is not a hyperparameter of btf; valid keys: compat, core"),
        (["--set", "novalue"], "--set expects KEY=VALUE, got 'novalue'"),
        (["--method", "nope"], "unknown method 'nope'; available: btf, cfm"),
    ],
)
def test_train_refuses_a_bad_hyperparameter_with_exit_2_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    command = ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), *args]
    assert main(command) == 2  # before the (missing) dataset is even looked at
    assert _error_line(capsys).startswith(f"mmiad train: error: {message}")


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="0123456789.-e {}tfalsu", max_size=5))
def test_any_epochs_text_is_either_accepted_or_refused_with_exit_2(text: str) -> None:
    """An int field takes exactly the JSON integers >= 0; anything else is a usage error naming the key."""
    try:
        parsed = json.loads(text)
        accepted = isinstance(parsed, int) and not isinstance(parsed, bool) and parsed >= 0
    except json.JSONDecodeError:
        accepted = False
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--set", f"epochs={text}"])
    if accepted:
        assert _hparams(args) == {"epochs": json.loads(text)}
    else:
        with pytest.raises(HparamError, match=r"^epochs=.* is not valid for cfm: (expected an integer|must be)"):
            _hparams(args)


@pytest.mark.parametrize(("text", "expected"), [("False", False), ("false", False), ("True", True), ("true", True)])
def test_boolean_spellings_become_booleans(text: str, expected: bool) -> None:
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--out", "o", "--set", f"random_init={text}"])
    assert _hparams(args) == {"random_init": expected}
    args = parser.parse_args(["train", "--method", "unircm", "--data", "d", "--out", "o", "--use-orq", text])
    assert _hparams(args) == {"use_orq": expected}
    args = parser.parse_args(["train", "--method", "unircm", "--data", "d", "--out", "o", "--use-orq"])
    assert _hparams(args) == {"use_orq": True}


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width


def test_help_describes_the_chosen_method_only(capsys: pytest.CaptureFixture[str]) -> None:
    cfm = _help(["train", "--help"], capsys)  # cfm by default
    assert "cfm hyperparameters" in cfm and "--aggregation TEXT" in cfm and "crossmodal (CFM) or intramodal" in cfm
    assert "--hidden" not in cfm
    unircm = _help(["train", "--method", "unircm", "--help"], capsys)
    assert "unircm hyperparameters" in unircm and "--hidden N" in unircm
    assert "Hidden size of the reference-guided blocks (512) [an integer; default 512]" in unircm
    assert "--use-orq [BOOL]" in unircm
    for cfm_text in ("--aggregation", "crossmodal", "CFM)", "box_cascade (official code"):
        assert cfm_text not in unircm
    btf = _help(["train", "--method", "btf", "--help"], capsys)
    assert "--coreset-fraction X" in btf and "--epochs" not in btf and "--aggregation" not in btf
    m3dm = _help(["import", "--method", "m3dm", "--help"], capsys)
    assert "m3dm hyperparameters" in m3dm and "--use-uff [BOOL]" in m3dm and "--aggregation" not in m3dm


def test_import_offers_the_methods_that_declare_importable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmiad.cli.import_command import importable_methods
    from mmiad.methods.registry import available_methods, get_method

    assert importable_methods() == ["cfm", "cmdr", "g2sf", "glfm", "m3dm", "unircm"]
    assert not get_method("btf").importable and "btf" in available_methods()
    with pytest.raises(SystemExit) as raised:
        main(["import", "--method", "btf", "--from", "x", "--out", str(tmp_path / "o")])
    assert raised.value.code == 2
    capsys.readouterr()
    base = ["import", "--method", "cfm", "--from", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert main([*base, "--set", "hidden=64"]) == 2
    assert _error_line(capsys).startswith("mmiad import: error: hidden is not a hyperparameter of cfm; valid keys:")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hparams_cli")
    data, run, cache = root / "data", root / "run", root / "cache"
    assert main(["synth", "--out", str(data), "--preset", "tiny", "--seed", "3", "--categories", "puck"]) == 0
    # compat=False as text: the bug this guards against trained with the truthy string "False".
    train = ["train", "--data", str(data), "--out", str(run), "--cache-dir", str(cache), "--set", "compat=False"]
    assert main([*train, *TINY]) == 0
    return {"data": data, "run": run, "cache": cache, "root": root}


def test_test_with_run_applies_an_inference_setting_and_records_it(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = trained["root"] / "metrics.json"
    base = ["test", "--run", str(trained["run"]), "--data", str(trained["data"]), "--cache-dir", str(trained["cache"])]
    assert main([*base, "--set", "aggregation=sum", "--json", str(metrics)]) == 0
    assert "applied to the trained models at inference: aggregation=sum" in capsys.readouterr().err
    assert json.loads(metrics.read_text())["inference_settings"] == {"aggregation": "sum"}


def _scores(path: Path) -> dict[str, float]:
    return {row["name"]: float(row["score"]) for row in csv.DictReader(path.open())}


def test_predict_with_run_scores_with_the_setting_as_the_library_does(trained: dict[str, Path]) -> None:
    defect = next(p for p in (trained["data"] / "puck" / "test").iterdir() if p.name != "good")
    out_sum, out_default = trained["root"] / "pred_sum", trained["root"] / "pred_default"
    base = ["predict", "--run", str(trained["run"]), "--input", str(defect), "--cache-dir", str(trained["cache"])]
    assert main([*base, "--out", str(out_sum), "--set", "aggregation=sum"]) == 0
    assert main([*base, "--out", str(out_default)]) == 0
    assert json.loads((out_sum / "inference_settings.json").read_text()) == {"aggregation": "sum"}
    assert not (out_default / "inference_settings.json").exists()
    # The library, told the same setting independently of the CLI, gives the same scores; the default differs.
    models = RunModels(trained["run"], cache_dir=str(trained["cache"]), overrides={"aggregation": "sum"})
    library = {p.record.stem: p.pred_score for p in models.predict(input_records(defect, category="puck"), "puck")}
    cli_sum, cli_default = _scores(out_sum / "predictions.csv"), _scores(out_default / "predictions.csv")
    assert cli_sum.keys() == library.keys() and len(library) >= 1
    for name, score in library.items():
        assert cli_sum[name] == pytest.approx(score, rel=1e-6)
        assert cli_default[name] != pytest.approx(score, rel=1e-3)
    # The run's thresholds were calibrated on the default scores: they label nothing after a rescoring.
    rows = list(csv.DictReader((out_sum / "predictions.csv").open()))
    assert all(row["label"] == "" and "no calibrated threshold" in row["note"] for row in rows)
    assert all(row["label"] in ("0", "1") for row in csv.DictReader((out_default / "predictions.csv").open()))


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("test", ["--set", "epochs=5"], "epochs=5 cannot change a trained cfm model (it is fixed when the model is"),
        ("test", ["--set", "mapping=intramodal"], "mapping=intramodal cannot change a trained cfm model"),
        ("predict", ["--set", "grid_size=8"], "grid_size=8 cannot change a trained cfm model"),
        ("test", ["--set", "aggregation=bogus"], "aggregation=bogus is not valid for cfm: expected one of product"),
        ("test", ["--set", "hidden=3"], "hidden is not a hyperparameter of cfm; valid keys: aggregation,"),
        ("test", ["--extractors", "weightfree"], "--extractors cannot change a trained run"),
        ("predict", ["--random-init"], "--random-init cannot change a trained run"),
    ],
)
def test_with_run_a_setting_that_cannot_change_the_model_is_refused(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str], command: str, args: list[str], message: str
) -> None:
    where = ["--data", str(trained["data"])] if command == "test" else ["--input", "x", "--out", "o"]
    assert main([command, "--run", str(trained["run"]), *where, *args]) == 2
    assert _error_line(capsys).startswith(f"mmiad {command}: error: {message}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "sigma=2"], "--resume RUN --add-categories keeps the run's hyperparameters; only --epochs applies"),
        (["--epochs", "2.5"], "epochs=2.5 is not valid for cfm: expected an integer"),
    ],
)
def test_extending_a_run_takes_only_epochs(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    extend = ["train", "--resume", str(trained["run"]), "--add-categories", "x", "--data", str(trained["data"])]
    assert main([*extend, *args]) == 2
    assert _error_line(capsys).startswith(f"mmiad train: error: {message}")


def test_onnx_refuses_settings_and_the_library_checks_its_overrides(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["predict", "--onnx", str(tmp_path / "export"), "--input", "x", "--out", str(tmp_path / "o")]
    assert main([*args, "--set", "aggregation=sum"]) == 2
    assert _error_line(capsys).startswith("mmiad predict: error: --set, --extractors, --weights-dir and --random")
    model_file = trained["run"] / "puck.safetensors"
    with pytest.raises(HparamError, match=r"^epochs=5 cannot change a trained cfm model"):
        load_trained(model_file, epochs=5)
    assert load_trained(model_file, compat="false").model.config.compat is False
