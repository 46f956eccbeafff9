"""Seconds per sample of ``test`` and ``predict`` through the engine's scoring loop, against the per-record loop it
replaced and against the backbones' batched forward alone, measured in one run (issue 21).

``python -m mmiad.bench scoring`` builds a CFM on a deep preset with random weights (the timing does not depend
on the weights; the MLPs are left at their seeded initialisation), takes ``--samples`` synthetic test samples at
``--source-size`` and times, interleaved ``--repeats`` times so that load changes hit every variant alike:

* ``backbones``: the 2D extractor's forward on batches of 8 model inputs plus the 3D extractor per cloud, on
  inputs already read and resized: the floor any loop has to pay;
* ``score``: the method's :meth:`~mmiad.methods.base.AnomalyModel.score` on features already extracted;
* ``test``: :func:`~mmiad.engine.trained.predict_records` (the loop: one read per file, batches of 8);
* ``test, per record``: the loop of commit 4dc6816: the modality check reading both files, then the model on one
  record at a time (one image per forward);
* ``predict`` and ``predict, per record``: the same plus writing maps, overlays, masks and the summary.

The feature cache is off (every variant extracts); the preprocessing cache is warm for all (preprocessed once
before timing). Overhead is the end-to-end time beyond backbones + score, relative to backbones + score.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmiad.bench.common import machine_description, replace_section


def _setup(preset: str, samples: int, source_size: int, temp: Path) -> tuple[Any, list[Any]]:
    """(TrainedModel with a fallback, test records) of a random-init CFM on ``preset``."""
    from mmiad.data.mvtec3d import list_categories, list_records
    from mmiad.data.synthetic import generate_dataset
    from mmiad.engine.trained import TrainedModel
    from mmiad.methods.cfm import CFM
    from mmiad.methods.fallback import ModalityFallback
    from mmiad.postprocess.threshold import Thresholds

    data = generate_dataset(
        temp / "data",
        preset="demo",
        seed=0,
        image_size=source_size,
        n_train=0,
        n_validation=0,
        n_test_good=samples,
        n_per_defect=0,
    )
    records = list_records(data, list_categories(data)[0], "test")[:samples]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CFM(cache_dir=str(temp / "cache"), extractors=preset, random_init=True, device="cpu")
        model.pipeline.cache = None  # every variant extracts: the loop is what is measured
    prepared = model.pipeline.preprocess(records)  # warm preprocessing cache for every variant
    first = model.pipeline.extract(prepared[0])
    model._build_networks(int(first.image.shape[0]), int(first.points.features.shape[1]))
    model.fitted_ = True
    fallback = ModalityFallback().fit([first])  # as a trained run has one (the old loop then checks modalities)
    thresholds = Thresholds(1.0, 1.0, float("nan"), "bench")
    return TrainedModel(model, thresholds, fallback=fallback, fallback_thresholds={"2d": thresholds}), records


def _per_record(trained: Any, records: Sequence[Any]) -> Iterator[Any]:
    """The loop of commit 4dc6816: check both modalities by reading the files, then score one record at a time."""
    from mmiad.engine.scoring import score_records
    from mmiad.methods.fallback import modality_problems

    for record in records:
        modality_problems(record)
        yield from score_records(trained.model, [record], thresholds=trained.thresholds, batch_size=1)


def bench_scoring(preset: str, samples: int, source_size: int, repeats: int) -> list[str]:
    """Table rows: median seconds per sample of each variant, and the overheads."""
    from mmiad.engine.trained import predict_records
    from mmiad.postprocess.outputs import write_predictions

    temp = Path(tempfile.mkdtemp(prefix="mmiad-bench-scoring-"))
    try:
        trained, records = _setup(preset, samples, source_size, temp)
        model, pipeline = trained.model, trained.model.pipeline
        inputs = [pipeline.load_inputs(r) for r in pipeline.preprocess(records)]
        features = [f for _, f in pipeline.iter_features(pipeline.preprocess(records))]
        model.prepare_scoring()

        def backbones() -> None:
            for start in range(0, len(inputs), 8):
                pipeline._run_extractors(inputs[start : start + 8])

        def predict(stream: Callable[[], Iterator[Any]], name: str) -> None:
            write_predictions(stream(), temp / "out" / name)

        variants: dict[str, Callable[[], Any]] = {
            "backbones (batched forward)": backbones,
            "score (the method)": lambda: model.score(features),
            "test (loop, batch 8)": lambda: list(predict_records(trained, records)),
            "test (per record, 4dc6816)": lambda: list(_per_record(trained, records)),
            "predict (loop, batch 8)": lambda: predict(lambda: predict_records(trained, records, keep_rgb=True), "a"),
            "predict (per record, 4dc6816)": lambda: predict(lambda: _per_record(trained, records), "b"),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        for repeat in range(repeats):  # each repeat starts one variant later, so no variant always runs first
            for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
                fn = variants[name]
                started = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - started) / len(records))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    floor = median["backbones (batched forward)"] + median["score (the method)"]
    rows = []
    for name, value in median.items():
        overhead = "" if name.startswith(("backbones", "score")) else f"{100 * (value / floor - 1):+.0f} %"
        rows.append(f"| {name} | {value:.3f} | {overhead} |")
    return rows


def _scoring_command(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    started = time.perf_counter()
    rows = bench_scoring(args.preset, args.samples, args.source_size, args.repeats)
    load = os.getloadavg()
    body = "\n".join(
        [
            f"Deep preset `{args.preset}` with random weights, CFM (grid 224), {args.samples} synthetic samples at "
            f"{args.source_size}², device cpu, {torch.get_num_threads()} torch threads; medians of {args.repeats} "
            f"interleaved repeats; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            f"({time.perf_counter() - started:.0f} s in all). Overhead: time beyond backbones + score, relative "
            "to them.",
            "",
            f"Machine: {machine_description()}",
            "",
            "| variant | s/sample | overhead |",
            "|---|---:|---:|",
            *rows,
            "",
            f"Command: `python -m mmiad.bench scoring --preset {args.preset} --samples {args.samples} "
            f"--source-size {args.source_size} --repeats {args.repeats}`",
        ]
    )
    print(body)
    if args.out:
        replace_section(Path(args.out), "scoring", body)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``scoring`` to the bench commands."""
    scoring = commands.add_parser("scoring", help="test/predict s/sample: the scoring loop vs per record vs backbones")
    scoring.add_argument(
        "--out", default="", help="markdown file whose scoring section is replaced (e.g. BENCHMARKS.md)"
    )
    scoring.add_argument("--preset", default="dino-pointmae")
    scoring.add_argument("--samples", type=int, default=16)
    scoring.add_argument("--source-size", type=int, default=400)
    scoring.add_argument("--repeats", type=int, default=3)
    scoring.set_defaults(handler=_scoring_command)
