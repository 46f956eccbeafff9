"""Per-stage inference timings and peak memory per extractor preset.

``python -m mmiad.bench stages`` times every stage of the inference pipeline per sample (read, preprocess, resize,
2D forward, FPS + grouping, 3D forward, interpolation, projection, CFM mapping and scoring) for each extractor
preset, in a fresh subprocess per preset so its peak memory (max RSS) is its own. Deep presets run with random
weights: their speed does not depend on the weights' values. Timings are medians over samples; ratios compare
numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmiad.bench.common import machine_description, replace_section
from mmiad.utils.memory import own_peak_rss_mb

STAGES = (
    "read",
    "preprocess",
    "resize",
    "2d_forward",
    "fps_grouping",
    "3d_forward",
    "interpolation",
    "projection",
    "mapping",
    "scoring",
)
EXTRACTION_STAGES = ("read", "resize", "2d_forward", "fps_grouping", "3d_forward", "interpolation")
BACKBONE_STAGES = ("2d_forward", "3d_forward")
OVERHEAD_STAGES = ("resize", "fps_grouping", "interpolation", "projection", "scoring")


def _timed(timings: dict[str, list[float]], stage: str, fn: Callable[..., Any]) -> Any:
    started = time.perf_counter()
    result = fn()
    timings[stage].append(time.perf_counter() - started)
    return result


def zoom_on_object(sample: Any, object_mask: np.ndarray, margin: float = 0.15) -> Any:
    """Crop a sample to its object's bounding box plus a margin.

    Synthetic objects fill ~5 % of the frame; MVTec 3D-AD objects fill a large part of it (up to ~50k valid points
    at 224×224). Cropping makes the point counts, and so the 3D stages' timings, representative of real data.
    """
    from dataclasses import replace

    rows, cols = np.nonzero(object_mask)
    height, width = object_mask.shape
    pad_r, pad_c = int((rows.max() - rows.min()) * margin), int((cols.max() - cols.min()) * margin)
    top, bottom = max(0, rows.min() - pad_r), min(height, rows.max() + pad_r + 1)
    left, right = max(0, cols.min() - pad_c), min(width, cols.max() + pad_c + 1)
    window = (slice(top, bottom), slice(left, right))
    gt = sample.gt_mask[window] if sample.gt_mask is not None else None
    return replace(sample, rgb=sample.rgb[window], xyz=sample.xyz[window], valid=sample.valid[window], gt_mask=gt)


def run_stages(
    preset: str, samples: int, image_size: int, data_root: Path, profile_name: str = "cfm"
) -> dict[str, Any]:
    """Per-stage timings of one preset (run inside the worker subprocess).

    ``profile_name`` ``none`` keeps the background plane (no removal, no crop to the object): the whole frame is
    valid, which is the densest cloud a sample can give the 3D extractor (~50,000 points at 224²).
    """
    from mmiad.data.formats import load_sample
    from mmiad.data.mvtec3d import list_categories, list_records
    from mmiad.data.preprocess import get_profile, prepare_input, preprocess_sample
    from mmiad.features.base import PointFeatures
    from mmiad.features.cache import FeatureCache
    from mmiad.features.grouping import group_points, three_nn_weights
    from mmiad.features.registry import build_extractors
    from mmiad.methods.cfm.mapping import FeatureProjectionMLP, cosine_loss, feature_discrepancy
    from mmiad.methods.cfm.scoring import finalize_map
    from mmiad.utils.compute import autocast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_extractor, point_extractor = build_extractors(preset, random_init=True)
    profile = get_profile(profile_name)
    per_category = [list_records(data_root, c, "test") for c in list_categories(data_root)]
    records = [r for group in zip(*per_category, strict=False) for r in group][:samples]  # round-robin
    torch.manual_seed(0)
    map_to_3d = FeatureProjectionMLP(image_extractor.out_channels, point_extractor.out_channels)
    map_to_2d = FeatureProjectionMLP(point_extractor.out_channels, image_extractor.out_channels)
    timings: dict[str, list[float]] = defaultdict(list)
    cache = FeatureCache(Path(tempfile.mkdtemp(prefix="mmiad-bench-cache-")))
    points_per_sample = []

    def one_sample(record: Any) -> None:
        sample = _timed(timings, "read", lambda: load_sample(record))
        if profile_name != "none":
            sample = zoom_on_object(sample, preprocess_sample(sample, profile).valid)
        cleaned = _timed(timings, "preprocess", lambda s=sample: preprocess_sample(s, profile))
        inputs = _timed(timings, "resize", lambda c=cleaned: prepare_input(c, size=image_size))
        with torch.inference_mode():
            image = _timed(timings, "2d_forward", lambda i=inputs: image_extractor.extract(i.rgb.unsqueeze(0))[0])
            if hasattr(point_extractor, "model"):  # Point-MAE: time grouping, forward and interpolation apart
                pixel_index = torch.from_numpy(inputs.valid.reshape(-1).nonzero()[0])
                points = torch.from_numpy(inputs.xyz.reshape(-1, 3)[pixel_index.numpy()].copy())
                preset_ = getattr(point_extractor, "preset")  # noqa: B009 (Point-MAE only)
                groups, centres = _timed(
                    timings, "fps_grouping", lambda: group_points(points, preset_.num_group, preset_.group_size)
                )
                features = _timed(timings, "3d_forward", lambda: point_extractor.model(groups, centres))
                neighbors, weights = _timed(timings, "interpolation", lambda: three_nn_weights(points, centres))
                point_features = PointFeatures(features, pixel_index, neighbors, weights, image_size)
            else:
                point_features = _timed(timings, "3d_forward", lambda i=inputs: point_extractor.extract(i.xyz, i.valid))
            points_per_sample.append(int(point_features.pixel_index.numel()))
            grid_3d = _timed(timings, "projection", lambda pf=point_features: pf.to_grid(image_size))
            # The official dense path, and both paths at Uni-RCM's / M3DM's 56×56 grid, for the projection table.
            _timed(timings, "projection_dense", lambda pf=point_features: pf.to_grid(image_size, method="dense"))
            _timed(timings, "projection_56", lambda pf=point_features: pf.to_grid(56))
            _timed(timings, "projection_56_dense", lambda pf=point_features: pf.to_grid(56, method="dense"))
            foreground = point_features.foreground(image_size).flatten()

            def mapping(im: torch.Tensor = image, g3: torch.Tensor = grid_3d) -> torch.Tensor:
                grid_2d = torch.nn.functional.interpolate(im[None], size=(image_size, image_size), mode="bilinear")[0]
                rows_2d, rows_3d = grid_2d.flatten(1).T[foreground], g3.flatten(1).T[foreground]
                return feature_discrepancy(map_to_3d(rows_2d), rows_3d) * feature_discrepancy(
                    map_to_2d(rows_3d), rows_2d
                )

            distances = _timed(timings, "mapping", mapping)
            # The same work in bf16 (a model trained with --precision bf16): backbones and mapping under autocast.
            with autocast("cpu", "bf16"):
                _timed(timings, "2d_forward_bf16", lambda i=inputs: image_extractor.extract(i.rgb.unsqueeze(0)))
                _timed(timings, "3d_forward_bf16", lambda i=inputs: point_extractor.extract(i.xyz, i.valid))
                _timed(timings, "mapping_bf16", mapping)

            def scoring(d: torch.Tensor = distances) -> float:
                combined = torch.zeros(image_size * image_size)
                combined[foreground] = d
                return finalize_map(
                    combined.view(image_size, image_size),
                    out_size=image_size,
                    smoothing="gaussian",
                    sigma=4.0,
                    compat=False,
                ).score

            _timed(timings, "scoring", scoring)
            tensors = {"image": image.contiguous(), **point_features.to_tensors("points")}
        cache.put("bench", tensors)
        _timed(timings, "cache_load", lambda: cache.get("bench"))
        grid_2d = torch.nn.functional.interpolate(image[None], size=(image_size, image_size), mode="bilinear")[0]
        rows_2d = grid_2d.flatten(1).T[foreground].clone()
        rows_3d = grid_3d.flatten(1).T[foreground].clone()

        def train_step() -> None:
            loss = cosine_loss(map_to_3d(rows_2d), rows_3d) + cosine_loss(map_to_2d(rows_3d), rows_2d)
            loss.backward()

        _timed(timings, "train_step", train_step)

    for index, record in enumerate([records[0], *records]):  # the first sample warms up and is dropped
        one_sample(record)
        if index == 0:
            for values in timings.values():
                values.clear()
            points_per_sample.clear()
    medians = {stage: statistics.median(values) for stage, values in timings.items() if values}
    return {
        "preset": preset,
        "samples": len(records),
        "points_median": int(statistics.median(points_per_sample)),
        "medians_s": medians,
        "peak_rss_mb": own_peak_rss_mb(),
    }


def _bf16_total(medians: dict[str, float], total: float) -> str:
    """The total with the backbones and the mapping timed under bf16 autocast (the 3D forward there includes the
    grouping and interpolation, which stay float32), in ms; — when the run did not time them."""
    swapped = ("2d_forward", "fps_grouping", "3d_forward", "interpolation", "mapping")
    low = ("2d_forward_bf16", "3d_forward_bf16", "mapping_bf16")
    if not all(name in medians for name in low):
        return "—"
    return f"{(total - sum(medians.get(n, 0.0) for n in swapped) + sum(medians[n] for n in low)) * 1000:.0f}"


def stages_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: one row per preset, one column per stage (ms), plus totals and overhead ratio."""
    header = "| preset | points | " + " | ".join(STAGES) + " | total | samples/s | overhead / backbones | peak RSS |"
    header += " total in bf16 ¹ |"
    lines = [header, "|" + "---|" * (len(STAGES) + 8)]
    for result in results:
        medians = result["medians_s"]
        total = sum(medians.get(s, 0.0) for s in STAGES)
        backbones = sum(medians.get(s, 0.0) for s in BACKBONE_STAGES)
        overhead = sum(medians.get(s, 0.0) for s in OVERHEAD_STAGES)
        cells = " | ".join(f"{medians[s] * 1000:.1f}" if s in medians else "—" for s in STAGES)
        lines.append(
            f"| {result['preset']} | {result['points_median']} | {cells} | {total * 1000:.0f} | {1 / total:.2f} | "
            f"{overhead / backbones:.0%} | {result['peak_rss_mb']:.0f} MB | {_bf16_total(medians, total)} |"
        )
    return "\n".join(lines)


def epoch_table(results: list[dict[str, Any]]) -> str:
    """Per training sample: an epoch that re-extracts (official CFM) vs one from the feature cache (mmiad)."""
    lines = [
        "| preset | re-extract + project + step (ms) | from memory: step (ms) | speed-up | "
        "from disk cache: load + project + step (ms) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        m = result["medians_s"]
        step, project, load = m["train_step"], m["projection"], m["cache_load"]
        reextract = sum(m.get(s, 0.0) for s in EXTRACTION_STAGES) + project + step
        from_disk = load + project + step
        lines.append(
            f"| {result['preset']} | {reextract * 1000:.0f} | {step * 1000:.0f} | {reextract / step:.0f}× | "
            f"{from_disk * 1000:.0f} | {reextract / from_disk:.1f}× |"
        )
    return "\n".join(lines)


def projection_table(results: list[dict[str, Any]]) -> str:
    """The 3D→grid projection as mmiad runs it vs the official dense map, measured in the same process."""
    lines = [
        "| preset | 224² mmiad (ms) | 224² official dense (ms) | speed-up | 56² mmiad (ms) | 56² official dense (ms) "
        "| speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        m = result["medians_s"]
        if "projection_dense" not in m:
            continue
        ours, dense, ours_56, dense_56 = (
            m[k] for k in ("projection", "projection_dense", "projection_56", "projection_56_dense")
        )
        lines.append(
            f"| {result['preset']} | {ours * 1000:.1f} | {dense * 1000:.1f} | {dense / ours:.1f}× | "
            f"{ours_56 * 1000:.1f} | {dense_56 * 1000:.1f} | {dense_56 / ours_56:.1f}× |"
        )
    return "\n".join(lines)


def _stages_command(args: argparse.Namespace) -> int:
    from mmiad.data.synthetic import generate_dataset

    with tempfile.TemporaryDirectory() as temp:
        # Only test samples are timed: skip the training splits (at 800×800 they would take minutes to render).
        per_category = max(1, -(-args.samples // 4))
        data = generate_dataset(
            Path(temp) / "data",
            preset="demo",
            seed=args.seed,
            image_size=args.source_size,
            n_train=0,
            n_validation=0,
            n_test_good=per_category,
            n_per_defect=1,
            defects=("bump",),
        )
        results = []
        for preset in args.presets.split(","):
            command = [
                sys.executable,
                "-m",
                "mmiad.bench",
                "worker",
                preset,
                str(args.samples),
                str(data),
                str(args.image_size),
                args.profile,
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(f"{preset}: {results[-1]['medians_s']}", file=sys.stderr)
    body = (
        f"### Inference stages per sample (median of {args.samples} samples, milliseconds)\n\n"
        f"Command: `python -m mmiad.bench stages --samples {args.samples} --presets {args.presets} "
        f"--profile {args.profile}`  \n"
        f"Machine: {machine_description()}  \n"
        f"Input: synthetic `demo` test samples rendered at {args.source_size}×{args.source_size} "
        + (
            "and cropped to the object plus a margin (so the object fills the frame as in MVTec 3D-AD), "
            if args.profile != "none"
            else "with no preprocessing (the background plane kept: every pixel is a point, the densest cloud), "
        )
        + "model input "
        f"{args.image_size}×{args.image_size}; deep presets with random weights. `overhead / backbones` is the time "
        "of resize, grouping, interpolation, projection and scoring over the two backbone forwards; "
        "read and preprocess are excluded (preprocessing is cached on disk after the first run). "
        "Peak RSS is that of a fresh process running only that preset. `mapping` is CFM's two MLPs on the "
        "foreground pixels of the 224×224 grid (the method itself, not pipeline overhead). ¹ The same sample with "
        "the backbones and the mapping under bf16 autocast (`--precision bf16`; grouping and interpolation stay "
        "float32 inside the 3D forward).\n\n"
        + stages_table(results)
        + "\n\n#### Training epoch per sample: re-extracting (official CFM) vs the feature cache\n\n"
        "`step` is one forward + backward of both MLPs on the sample's foreground pixels; the official code "
        "re-reads, re-resizes and re-extracts every sample every epoch; mmiad keeps the training rows in memory "
        "(up to `memory_budget_gb`) or reloads them from the on-disk feature cache.\n\n"
        + epoch_table(results)
        + "\n\n#### 3D→grid projection: sparse product vs the official dense map\n\n"
        "Point-MAE's groups are projected as one sparse product (`mmiad.features.projection`); per-pixel features "
        "(FPFH) keep the dense path, which is faster for them, so their two columns time the same code.\n\n"
        + projection_table(results)
    )
    replace_section(Path(args.out), "stages" if args.profile == "cfm" else f"stages-{args.profile}", body)
    print(body)
    return 0


def _worker_command(args: argparse.Namespace) -> int:
    result = run_stages(args.preset, args.samples, args.image_size, Path(args.data), args.profile)
    print(json.dumps(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``stages`` (and its per-preset ``worker``) to ``python -m mmiad.bench``."""
    stages = commands.add_parser("stages", help="per-stage inference timings and peak memory per preset")
    stages.add_argument("--out", default="BENCHMARKS.md")
    stages.add_argument("--presets", default="weightfree,dino-pointmae,dino-pointmae-s,dino-pointmae-t")
    stages.add_argument("--samples", type=int, default=5)
    stages.add_argument("--image-size", type=int, default=224)
    stages.add_argument("--source-size", type=int, default=800, help="rendered side (MVTec 3D-AD: 800)")
    stages.add_argument("--seed", type=int, default=0)
    stages.add_argument(
        "--profile",
        default="cfm",
        help="preprocessing: cfm (plane removed, cropped to the object) or none (whole frame)",
    )
    stages.set_defaults(handler=_stages_command)
    worker = commands.add_parser("worker", help="(internal) one preset in a fresh process")
    worker.add_argument("preset")
    worker.add_argument("samples", type=int)
    worker.add_argument("data")
    worker.add_argument("image_size", type=int)
    worker.add_argument("profile", nargs="?", default="cfm")
    worker.set_defaults(handler=_worker_command)
