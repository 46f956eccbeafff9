"""The incremental unified protocol (IB-IUMAD, CVPR 2026): classes arrive in steps, and forgetting is measured.

``python -m mmiad.bench incremental --data D --methods unircm,glfm --setting 6-1x4 --out DIR`` trains a unified
model on the base classes, adds the next classes step by step through the engine's add-categories mechanism
(:func:`~mmiad.engine.runs.extend_run`, the one behind ``mmiad train --resume RUN --add-categories``), tests on
every class seen so far after each step, and retrains each method from scratch on all of them as the upper
bound. It writes ``DIR/incremental.json`` and ``DIR/incremental.md``.

The protocol (``shared/reference/methods/incremental-protocol.md``):

* Settings ``10-0``, ``9-1``, ``6-4``, ``6-1x4``, or any ``BASE-NEW[xSTEPS]``: BASE classes first, then STEPS
  steps of NEW classes each (``2-1`` on three classes: two, then one). The class order is IB-IUMAD's for MVTec
  3D-AD and Eyecandies, alphabetical for any other dataset.
* A step trains on its new classes' training split only (validation "good" images calibrate the thresholds; the
  protocol's training set also counts them, mmiad keeps them for calibration). Never test images: IB-IUMAD's
  released Eyecandies split files list each new class's test images as training data; mmiad does not.
  ``--replay`` lets a method see the earlier classes' training samples again (Uni-RCM's own extend does).
* A method that cannot add categories (no ``extend``) is listed as such and the others run. CFM's ``extend``
  trains its two mappings on (plain fine-tuning, mmiad's addition; the paper has no incremental setting).
* Metrics are mmiad's own on the test split: no checkpoint selection on the test set, no flipping of AUROCs
  below 0.5 (IB-IUMAD's evaluator flips them; ``--compat-flip`` does so, named as such).
* Forgetting, per metric: for every class learned before the last step, its best score at an earlier step minus
  its final score, averaged (IUF's lineage); negative means the final model is better.

Every step's model folder is kept (``DIR/METHOD/step-N``) and the results are written after each step, so an
interrupted run resumes at the first unfinished step and any step can be re-evaluated.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmiad.utils.atomic import write_json, write_text

MVTEC3D_ORDER = ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire")
EYECANDIES_ORDER = (
    "CandyCane",
    "ChocolateCookie",
    "ChocolatePraline",
    "Confetto",
    "GummyBear",
    "HazelnutTruffle",
    "LicoriceSandwich",
    "Lollipop",
    "Marshmallow",
    "PeppermintCandy",
)
KNOWN_ORDERS = (MVTEC3D_ORDER, EYECANDIES_ORDER)
METRICS = ("image_auroc", "aupro@0.3")
_SETTING = re.compile(r"^(\d+)-(\d+)(?:x(\d+))?$")


@dataclass(frozen=True)
class Setting:
    """``BASE-NEW[xSTEPS]``: BASE classes, then STEPS steps of NEW classes (1 step when NEW > 0, none for NEW 0)."""

    base: int
    new: int
    steps: int

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``10-0``, ``9-1``, ``6-4``, ``6-1x4``, ``2-1``... (``×`` is accepted for ``x``)."""
        found = _SETTING.match(text.strip().replace("×", "x"))
        if not found:
            raise ValueError(f"unknown setting {text!r}; expected BASE-NEW[xSTEPS], e.g. 10-0, 9-1, 6-4, 6-1x4")
        base, new = int(found.group(1)), int(found.group(2))
        steps = int(found.group(3)) if found.group(3) else (1 if new else 0)
        if base < 1 or (new == 0) != (steps == 0):
            raise ValueError(f"setting {text!r}: need BASE >= 1, and NEW and STEPS both zero or both positive")
        return cls(base, new, steps)

    @property
    def total(self) -> int:
        """Classes learned by the end."""
        return self.base + self.new * self.steps


def class_order(categories: Sequence[str]) -> list[str]:
    """IB-IUMAD's order when the categories are MVTec 3D-AD's or Eyecandies' (or a subset), else alphabetical."""
    names = set(categories)
    for order in KNOWN_ORDERS:
        if names <= set(order):
            return [c for c in order if c in names]
    return sorted(names)


def plan_steps(setting: Setting, categories: Sequence[str]) -> list[list[str]]:
    """The classes each step adds, in the protocol's order.

    Raises:
        ValueError: when the setting needs more classes than the dataset has.
    """
    order = class_order(categories)
    if setting.total > len(order):
        raise ValueError(f"setting {setting.base}-{setting.new}x{setting.steps} needs {setting.total} classes; "
                         f"the data has {len(order)}: {', '.join(order)}")  # fmt: skip
    steps = [order[: setting.base]]
    for index in range(setting.steps):
        start = setting.base + index * setting.new
        steps.append(order[start : start + setting.new])
    return steps


def flipped(value: float | None) -> float | None:
    """IB-IUMAD's evaluator: an AUROC below 0.5 becomes 1 − AUROC (``--compat-flip`` only)."""
    return None if value is None else max(value, 1.0 - value)


def forgetting(history: Sequence[Mapping[str, float | None]]) -> float | None:
    """Mean over the classes learned before the last step of (best earlier score − final score).

    Args:
        history: Per step, the score of each class tested at that step (the last entry is the final model).

    Returns:
        The mean, or None with a single step or no class seen before the last one.
    """
    if len(history) < 2:
        return None
    final = history[-1]
    drops = []
    for name, last in final.items():
        earlier = [float(v) for step in history[:-1] if (v := step.get(name)) is not None]
        if earlier and last is not None:
            drops.append(max(earlier) - last)
    return sum(drops) / len(drops) if drops else None


def _scores(result: Mapping[str, Any], metric: str, flip: bool) -> dict[str, float | None]:
    rows = result["per_category"]
    return {c: (flipped(r.get(metric)) if flip and "auroc" in metric else r.get(metric)) for c, r in rows.items()}


def _mean(values: Mapping[str, float | None]) -> float | None:
    present = [v for v in values.values() if v is not None]
    return sum(present) / len(present) if present else None


def run_method(
    method: str,
    data: Path,
    out: Path,
    steps: Sequence[Sequence[str]],
    *,
    hparams: dict[str, Any],
    epochs: int,
    replay: bool,
    flip: bool,
    cache_dir: str,
    state: dict[str, Any],
    save: Any,
) -> dict[str, Any]:
    """One method through every step (resuming from ``state``), then its from-scratch upper bound."""
    from mmiad.engine import evaluate_run, extend_run, train_run
    from mmiad.methods.registry import get_method

    if not hasattr(get_method(method), "extend"):
        raise ValueError(f"method {method!r} cannot add categories to a trained model (no extend); retrain it")
    record = state.setdefault(method, {"steps": []})
    live = out / method / "live"
    seen: list[str] = []
    for index, added in enumerate(steps):
        seen = [*seen, *added]
        folder = out / method / f"step-{index}"
        if index < len(record["steps"]) and folder.is_dir():
            continue  # done before an interruption: its model folder and results are kept
        if index == 0:
            train_run(method, data, live, categories=list(added), unified=True, hparams=hparams, cache_dir=cache_dir)
        else:
            previous = out / method / f"step-{index - 1}"
            if live.exists():
                shutil.rmtree(live)
            shutil.copytree(previous, live)
            extend_run(live, data, list(added), epochs=epochs, cache_dir=cache_dir, replay=replay)
        result, _ = evaluate_run(live, data, categories=seen, cache_dir=cache_dir)
        if folder.exists():
            shutil.rmtree(folder)
        live.rename(folder)
        step: dict[str, Any] = {"added": list(added), "seen": list(seen)}
        step.update({metric: _scores(result, metric, flip) for metric in METRICS})
        record["steps"] = [*record["steps"][:index], step]
        save()
    history = record["steps"]
    record["final"] = {metric: _mean(history[-1][metric]) for metric in METRICS}
    record["forgetting"] = {metric: forgetting([s[metric] for s in history]) for metric in METRICS}
    if "upper_bound" not in record:
        scratch = out / method / "from-scratch"
        train_run(method, data, scratch, categories=seen, unified=True, hparams=hparams, cache_dir=cache_dir)
        result, _ = evaluate_run(scratch, data, categories=seen, cache_dir=cache_dir)
        record["upper_bound"] = {metric: _mean(_scores(result, metric, flip)) for metric in METRICS}
        save()
    return record


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown(state: Mapping[str, Any], setting: str, steps: Sequence[Sequence[str]]) -> str:
    """The table: per method and step, mean I-AUROC / AUPRO over the classes seen; final, forgetting, upper bound."""
    plan = "; ".join(f"step {i}: {', '.join(s)}" for i, s in enumerate(steps))
    lines = [
        f"Setting {setting} ({plan}).",
        "",
        "| method | step | classes seen | I-AUROC | AUPRO@30% |",
        "|---|---|---|---|---|",
    ]
    for method, record in state["methods"].items():
        for index, done in enumerate(record.get("steps", [])):
            cells = " | ".join(_cell(_mean(done[m])) for m in METRICS)
            lines.append(f"| {method} | {index} | {len(done['seen'])} | {cells} |")
    lines += ["", "| method | final I-AUROC | final AUPRO | forgetting I-AUROC | forgetting AUPRO | "
              "from scratch I-AUROC | from scratch AUPRO |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, record in state["methods"].items():
        if "refused" in record:
            lines.append(f"| {method} | {record['refused']} |" + " |" * 5)
            continue
        parts = [record.get(k, {}) for k in ("final", "forgetting", "upper_bound")]
        row = [_cell(d.get(m)) for d in parts for m in METRICS]
        lines.append(f"| {method} | {' | '.join(row)} |")
    return "\n".join(lines) + "\n"


def run_protocol(
    data: str | Path,
    methods: Sequence[str],
    setting: str,
    out: str | Path,
    *,
    hparams: Mapping[str, dict[str, Any]] | None = None,
    epochs: int = 1,
    replay: bool = False,
    flip: bool = False,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Run the protocol for every method (resuming from ``out/incremental.json``) and write both reports."""
    from mmiad.data.formats import open_dataset

    out, data = Path(out), Path(data)
    steps = plan_steps(Setting.parse(setting), open_dataset(data).categories())
    index = out / "incremental.json"
    state: dict[str, Any] = {"setting": setting, "steps": steps, "replay": replay, "compat_flip": flip, "methods": {}}
    if index.is_file():
        previous = json.loads(index.read_text(encoding="utf-8"))
        if previous.get("steps") == steps and previous.get("replay") == replay and previous.get("compat_flip") == flip:
            state = previous

    def save() -> None:
        write_json(index, state)
        write_text(out / "incremental.md", markdown(state, setting, steps))

    cache = cache_dir or str(out / "cache")
    for method in methods:
        from mmiad.methods.registry import get_method

        if not hasattr(get_method(method), "extend"):  # recorded, so the other methods still run
            state["methods"][method] = {"refused": "cannot add categories to a trained model (no extend)"}
            save()
            continue
        run_method(
            method,
            data,
            out,
            steps,
            hparams=dict((hparams or {}).get(method, {})),
            epochs=epochs,
            replay=replay,
            flip=flip,
            cache_dir=cache,
            state=state["methods"],
            save=save,
        )
        save()
    return state


def _value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _command(args: argparse.Namespace) -> int:
    from mmiad.methods.registry import get_method

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    hparams: dict[str, dict[str, Any]] = {}
    for method in methods:
        settings = dict(get_method(method).tiny_hparams) if args.tiny else {}
        for item in args.set or []:
            key, _, value = item.partition("=")
            settings[key] = _value(value)
        if args.extractors:
            settings["extractors"] = args.extractors
        if args.device:
            settings["device"] = args.device
        hparams[method] = settings
    state = run_protocol(
        args.data,
        methods,
        args.setting,
        args.out,
        hparams=hparams,
        epochs=args.epochs,
        replay=args.replay,
        flip=args.compat_flip,
        cache_dir=args.cache_dir,
    )
    print(markdown(state, args.setting, state["steps"]))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``incremental`` to ``python -m mmiad.bench``."""
    parser = commands.add_parser("incremental", help="IB-IUMAD's incremental unified protocol with forgetting")
    parser.add_argument("--data", required=True, help="dataset root (MVTec 3D-AD, Eyecandies or mmiad layout)")
    parser.add_argument("--methods", required=True, help="comma-separated unified methods that can add categories")
    parser.add_argument("--setting", required=True, help="10-0, 9-1, 6-4, 6-1x4 or BASE-NEW[xSTEPS]")
    parser.add_argument("--out", required=True, help="output folder (resumed when it holds incremental.json)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of each added step (extend)")
    parser.add_argument("--extractors", help="extractors for every method (default: each method's)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="a hyperparameter for every method")
    parser.add_argument("--tiny", action="store_true", help="each method's tiny settings (smoke runs, tests)")
    parser.add_argument("--replay", action="store_true", help="let a step see the earlier classes' samples")
    parser.add_argument("--compat-flip", action="store_true", help="IB-IUMAD's evaluator: AUROC < 0.5 → 1 − AUROC")
    parser.add_argument("--cache-dir")
    parser.set_defaults(handler=_command)
