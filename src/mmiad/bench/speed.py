"""Before/after timings of the training-side algorithms that issue 15 sped up, measured in one run.

``python -m mmiad.bench speed`` times, on the same inputs and interleaved (so CPU contention hits both sides
alike), the previous and the current implementation of:

* the greedy coreset of the memory banks (selections per second, and whether the selections are identical);
* farthest point sampling: the NumPy path and the torch path that runs on any device (same indices);
* kNN grouping: the k-d tree and the brute-force torch path that runs on any device (same indices);
* one Lloyd iteration of the ORQ k-means at the paper's 2D sizes (previous torch, current torch, faiss, and the
  bare matrix product as the arithmetic limit), extrapolated to the full ORQ fit;
* a training epoch per sample of a deep preset: re-extracting vs reading the feature cache before/after the lazy
  inputs fix, with CFM's mapping step at the 224² grid and at the 56² grid;
* CFM's training step per sample at the 224² grid on ``--device``: fp32, bf16 autocast, and ``pixel_subset``
  (section ``cfmstep``, not in the default list).

The previous implementations are kept here, verbatim from commit 0b2669a, only to measure the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmiad.bench.common import machine_description, replace_section


def _cached_points(cache: Any, key: str) -> Any:
    """A cache entry's point features (the timed cache read)."""
    from mmiad.features.base import PointFeatures

    entry = cache.get(key)
    assert entry is not None, "the entry was just written"
    return PointFeatures.from_tensors(entry, "points")


def _median_seconds(fn: Callable[..., Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each function, run round-robin ``repeats`` times so load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}, results


# ----------------------------------------------------------------------------- previous implementations (0b2669a)
def _previous_greedy_select(projected: torch.Tensor, n_select: int) -> torch.Tensor:
    """The greedy loop before: every step converts 16 M-value blocks of the float16 bank to new float32 tensors."""
    total, width = projected.shape
    step = max(1, 2**24 // max(width, 1))
    min_dist = torch.full((total,), float("inf"))
    selected = torch.empty(n_select, dtype=torch.long)
    current = 0
    for position in range(n_select):
        selected[position] = current
        last = projected[current].float()
        for start in range(0, total, step):
            block = projected[start : start + step].float()
            squared = ((block - last) ** 2).sum(dim=1)
            torch.minimum(min_dist[start : start + step], squared, out=min_dist[start : start + step])
        current = int(torch.argmax(min_dist))
    return selected


def _previous_nearest(points: torch.Tensor, centres: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    centre_norms = (centres * centres).sum(dim=1)
    indices = torch.empty(points.shape[0], dtype=torch.long)
    distances = torch.empty(points.shape[0], dtype=points.dtype)
    for start in range(0, points.shape[0], chunk):
        block = points[start : start + chunk]
        squared = (block * block).sum(dim=1, keepdim=True) - 2 * block @ centres.T + centre_norms
        best, index = squared.min(dim=1)
        indices[start : start + chunk] = index
        distances[start : start + chunk] = best.clamp_min(0.0)
    return indices, distances


def _previous_lloyd_iteration(points: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    k = centres.shape[0]
    centres = centres.clone()
    assignment, distances = _previous_nearest(points, centres, chunk)
    sums = torch.zeros_like(centres).index_add_(0, assignment, points)
    counts = torch.bincount(assignment, minlength=k)
    nonempty = counts > 0
    centres[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).to(points.dtype)
    empty = torch.nonzero(~nonempty).flatten()
    if empty.numel():
        farthest = torch.argsort(distances, descending=True)[: empty.numel()]
        centres[empty] = points[farthest]
    return centres


def _previous_kmeans(points: torch.Tensor, k: int, iterations: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = points[torch.randperm(points.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        centres = _previous_lloyd_iteration(points, centres)
    return centres


# ----------------------------------------------------------------------------- sections
def bench_coreset(rows: int, steps: int, repeats: int) -> tuple[str, dict[str, float]]:
    from mmiad.methods.memorybank.coreset import _greedy_select, jl_min_dim

    width = jl_min_dim(rows, 0.9)
    projected = torch.randn(rows, width, generator=torch.Generator().manual_seed(0)).half()
    medians, results = _interleaved(
        {
            "previous": lambda: _previous_greedy_select(projected, steps),
            "current": lambda: _greedy_select(projected, steps),
        },
        repeats,
    )
    same = torch.equal(results["previous"], results["current"])
    rate = {name: steps / seconds for name, seconds in medians.items()}
    line = (
        f"| greedy coreset, {rows:,}×{width} float16 bank, {steps} selections | {rate['previous']:.1f} sel/s | "
        f"{rate['current']:.1f} sel/s | {rate['current'] / rate['previous']:.1f}× | "
        f"{'identical' if same else 'DIFFERENT'} |"
    )
    return line, rate


def bench_grouping(points: int, centres: int, k: int, repeats: int) -> list[str]:
    from mmiad.features.grouping import farthest_point_sample, farthest_point_sample_torch, knn_indices

    cloud = np.random.default_rng(0).normal(size=(points, 3)).astype(np.float32) * 0.05
    tensor = torch.from_numpy(cloud)
    medians, results = _interleaved(
        {
            "numpy": lambda: farthest_point_sample(cloud, centres, backend="numpy"),
            "torch": lambda: farthest_point_sample_torch(tensor, centres).numpy(),
        },
        repeats,
    )
    same_fps = np.array_equal(results["numpy"], results["torch"])
    queries = tensor[torch.from_numpy(results["numpy"])]
    knn, knn_results = _interleaved(
        {
            "kdtree": lambda: knn_indices(tensor, queries, k, backend="kdtree")[0],
            "brute": lambda: knn_indices(tensor, queries, k, backend="brute")[0],
        },
        repeats,
    )
    same_knn = torch.equal(knn_results["kdtree"], knn_results["brute"])
    return [
        f"| FPS, {centres} of {points:,} points: NumPy (CPU default) → torch (any device; CPU timed) | "
        f"{medians['numpy'] * 1000:.0f} ms | {medians['torch'] * 1000:.0f} ms | "
        f"{medians['numpy'] / medians['torch']:.2f}× | {'identical' if same_fps else 'DIFFERENT'} |",
        f"| kNN, k={k} for {centres} centres: k-d tree (CPU default) → brute torch (any device; CPU timed) | "
        f"{knn['kdtree'] * 1000:.0f} ms | {knn['brute'] * 1000:.0f} ms | {knn['kdtree'] / knn['brute']:.2f}× | "
        f"{'identical' if same_knn else 'DIFFERENT'} |",
    ]


def bench_orq(rows: int, dim: int, codes: int, repeats: int, target_rows: int) -> tuple[list[str], list[str]]:
    from mmiad.methods.unircm.orq import _nearest, faiss_available, kmeans

    points = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    start = points[torch.randperm(rows, generator=torch.Generator().manual_seed(1))[:codes]].clone()

    def current() -> torch.Tensor:
        # One Lloyd iteration of kmeans from the same start (iterations=1 redraws the same random init).
        return kmeans(points, codes, iterations=1, seed=1)

    fns: dict[str, Callable[[], Any]] = {
        "previous": lambda: _previous_lloyd_iteration(points, start),
        "current": current,
        "gemm": lambda: torch.mm(points, start.T),
    }
    if faiss_available():
        fns["faiss"] = lambda: kmeans(points, codes, iterations=1, seed=1, use_faiss=True)
    medians, results = _interleaved(fns, repeats)
    agree = float(
        (_nearest(points, results["previous"], 8192)[0] == _nearest(points, results["current"], 8192)[0]).float().mean()
    )
    flops = 2 * rows * dim * codes
    # A full fit: 4 layers × 20 iterations, plus the encoding pass after each layer and layer 1's raw-mean pass.
    passes = 4 * 20 + 4 + 1
    scale = target_rows / rows * passes / 60
    rows_out = []
    for name in fns:
        if name == "gemm":
            continue
        seconds = medians[name]
        rows_out.append(
            f"| {name} | {seconds:.2f} s | {flops / seconds / 1e9:.0f} GFLOP/s | {medians['gemm'] / seconds:.0%} | "
            f"{seconds * scale:.0f} min |"
        )
    rows_out.append(
        f"| bare matrix product (the arithmetic) | {medians['gemm']:.2f} s | "
        f"{flops / medians['gemm'] / 1e9:.0f} GFLOP/s | 100% | {medians['gemm'] * scale:.0f} min |"
    )
    summary = [
        f"| ORQ k-means, one Lloyd iteration at {rows:,}×{dim}, K={codes} (extrapolated full fit) | "
        f"{medians['previous']:.2f} s ({medians['previous'] * scale:.0f} min) | "
        f"{medians['current']:.2f} s ({medians['current'] * scale:.0f} min) | "
        f"{medians['previous'] / medians['current']:.1f}× | {agree:.2%} same codes after the iteration |"
    ]
    return summary, rows_out


def bench_kmeans(rows: int, dim: int, codes: int, iterations: int) -> tuple[str, list[float]]:
    """A whole k-means (once each): previous path, current path (with its bounds), faiss."""
    from mmiad.methods.unircm.orq import _initial_centres, _lloyd, _nearest, faiss_available, kmeans

    points = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    fns: dict[str, Callable[[], Any]] = {
        "previous": lambda: _previous_kmeans(points, codes, iterations, 1),
        "current": lambda: _lloyd(points, _initial_centres(points, codes, 1, "random", 8192), iterations, 8192),
    }
    if faiss_available():
        fns["faiss"] = lambda: kmeans(points, codes, iterations=iterations, seed=1, use_faiss=True)
    medians, results = _interleaved(fns, 1)
    centres, compared = results["current"]
    same = float((_nearest(points, results["previous"], 8192)[0] == _nearest(points, centres, 8192)[0]).float().mean())
    faiss_cell = f"; faiss {medians['faiss']:.0f} s" if "faiss" in medians else ""
    line = (
        f"| ORQ k-means, whole fit of one codebook: {rows:,}×{dim}, K={codes}, {iterations} iterations "
        f"(mean share of points compared with all centres: {statistics.mean(compared):.0%}) | "
        f"{medians['previous']:.0f} s | {medians['current']:.0f} s{faiss_cell} | "
        f"{medians['previous'] / medians['current']:.2f}× | {same:.2%} same final codes |"
    )
    return line, compared


def _deep_samples(preset: str, samples: int, source_size: int) -> tuple[Path, list[Any], Any, Any]:
    """(temporary folder, synthetic records, image extractor, point extractor) of a random-init deep preset.

    The caller deletes the folder.
    """
    from mmiad.data.mvtec3d import list_categories, list_records
    from mmiad.data.synthetic import generate_dataset
    from mmiad.features.registry import build_extractors

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_extractor, point_extractor = build_extractors(preset, random_init=True)
    temp = Path(tempfile.mkdtemp(prefix="mmiad-bench-speed-"))
    data = generate_dataset(
        temp / "data",
        preset="demo",
        seed=0,
        image_size=source_size,
        n_train=0,
        n_validation=0,
        n_test_good=max(1, samples),
        n_per_defect=0,
    )
    category = list_categories(data)[0]
    return temp, list_records(data, category, "test")[:samples], image_extractor, point_extractor


def _object_inputs(sample: Any) -> tuple[Any, Any]:
    """(cleaned sample, 224² model input) of a sample zoomed on its object, as ``bench stages`` crops it."""
    from mmiad.bench.stages import zoom_on_object
    from mmiad.data.preprocess import get_profile, prepare_input, preprocess_sample

    profile = get_profile("cfm")
    sample = zoom_on_object(sample, preprocess_sample(sample, profile).valid)  # the object fills the frame
    cleaned = preprocess_sample(sample, profile)
    return cleaned, prepare_input(cleaned, size=224)


def bench_epoch(preset: str, samples: int, source_size: int, repeats: int) -> list[str]:
    """Per training sample: re-extract vs the feature cache (before: eager read + resize; after: lazy)."""
    from mmiad.data.formats import load_sample
    from mmiad.data.preprocess import prepare_input
    from mmiad.features.cache import FeatureCache
    from mmiad.features.pipeline import SampleFeatures
    from mmiad.methods.cfm.mapping import FeatureProjectionMLP, cosine_loss
    from mmiad.utils.compute import autocast

    temp, records, image_extractor, point_extractor = _deep_samples(preset, samples, source_size)
    cache = FeatureCache(temp / "cache")
    torch.manual_seed(0)
    map_to_3d = FeatureProjectionMLP(image_extractor.out_channels, point_extractor.out_channels)
    map_to_2d = FeatureProjectionMLP(point_extractor.out_channels, image_extractor.out_channels)
    timings: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Any:
        seconds, result = _median_seconds(fn, repeats)
        timings.setdefault(name, []).append(seconds)
        return result

    for index, record in enumerate(records):
        cleaned, inputs = _object_inputs(load_sample(record))

        def read(r: Any = record) -> Any:
            return load_sample(r)

        def extract(inputs: Any) -> SampleFeatures:
            with torch.inference_mode():
                image = image_extractor.extract(inputs.rgb.unsqueeze(0))[0].float().contiguous()
                points = point_extractor.extract(inputs.xyz, inputs.valid)
            return SampleFeatures(image, points, inputs)

        features = extract(inputs)
        key = f"sample-{index}"
        cache.put(key, {"image": features.image, **features.points.to_tensors("points")})
        timed("read", read)
        timed("resize", lambda c=cleaned: prepare_input(c, size=224))
        timed("extract", lambda i=inputs: extract(i))
        timed("cache_get", partial(_cached_points, cache, key))
        for grid in (224, 56):
            grid_2d, grid_3d, foreground = timed(f"on_grid_{grid}", lambda g=grid, f=features: f.on_grid(g))
            mask = foreground.flatten()
            rows_2d, rows_3d = grid_2d.flatten(1).T[mask].clone(), grid_3d.flatten(1).T[mask].clone()

            def step(r2: torch.Tensor = rows_2d, r3: torch.Tensor = rows_3d) -> None:
                loss = cosine_loss(map_to_3d(r2), r3) + cosine_loss(map_to_2d(r3), r2)
                loss.backward()

            timed(f"step_{grid}", step)
            if grid == 224:  # the CPU user's options: bf16 autocast on a quarter of the foreground pixels
                kept = torch.randperm(len(rows_2d), generator=torch.Generator().manual_seed(index))
                kept = kept[: max(1, round(0.25 * len(rows_2d)))].sort().values
                few_2d, few_3d = rows_2d[kept], rows_3d[kept]

                def fast_step(r2: torch.Tensor = few_2d, r3: torch.Tensor = few_3d) -> None:
                    with autocast("cpu", "bf16"):
                        loss = cosine_loss(map_to_3d(r2), r3) + cosine_loss(map_to_2d(r3), r2)
                    loss.float().backward()

                timed("step_224_fast", fast_step)
    shutil.rmtree(temp, ignore_errors=True)
    m = {name: statistics.median(values) for name, values in timings.items()}
    lines = []
    for grid in (224, 56):
        step_s, on_grid = m[f"step_{grid}"], m[f"on_grid_{grid}"]
        reextract = m["read"] + m["resize"] + m["extract"] + on_grid + step_s
        before = m["read"] + m["resize"] + m["cache_get"] + on_grid + step_s
        after = m["cache_get"] + on_grid + step_s
        lines.append(
            f"| {preset}, {grid}² grid | {reextract * 1000:.0f} | {before * 1000:.0f} ({reextract / before:.1f}×) | "
            f"{after * 1000:.0f} ({reextract / after:.1f}×) | {(m['cache_get'] + on_grid) * 1000:.0f} | "
            f"{step_s * 1000:.0f} | {reextract / step_s:.1f}× |"
        )
        if grid == 224:
            fast = m["step_224_fast"]
            after_fast = m["cache_get"] + on_grid + fast
            lines.append(
                f"| {preset}, 224² grid, step in bf16 on `pixel_subset` 0.25 (re-extract column: the official fp32 "
                f"loop) | {reextract * 1000:.0f} | — | {after_fast * 1000:.0f} ({reextract / after_fast:.1f}×) | "
                f"{(m['cache_get'] + on_grid) * 1000:.0f} | {fast * 1000:.0f} | {reextract / fast:.1f}× |"
            )
    return lines


#: (label, precision, pixel_subset) of the CFM step variants; the first is the reference of the ratios.
CFM_STEP_VARIANTS = (
    ("fp32, all pixels", "fp32", None),
    ("bf16, all pixels", "bf16", None),
    ("fp32, pixel_subset 0.25", "fp32", 0.25),
    ("bf16, pixel_subset 0.25", "bf16", 0.25),
)


def bench_cfm_step(preset: str, samples: int, source_size: int, repeats: int, device_name: str) -> list[str]:
    """CFM's training step per sample at the 224² grid: forward + backward + Adam step of both MLPs on one
    image's foreground rows, through the trainer's own functions, for each of :data:`CFM_STEP_VARIANTS`."""
    from mmiad.data.formats import load_sample
    from mmiad.features.pipeline import SampleFeatures
    from mmiad.methods.cfm.mapping import FeatureProjectionMLP
    from mmiad.methods.cfm.training import accumulate_batch, sample_pixels, subset_generator
    from mmiad.utils.compute import resolve_device, synchronize

    device = resolve_device(device_name)
    temp, records, image_extractor, point_extractor = _deep_samples(preset, samples, source_size)
    torch.manual_seed(0)
    map_to_3d = FeatureProjectionMLP(image_extractor.out_channels, point_extractor.out_channels).to(device)
    map_to_2d = FeatureProjectionMLP(point_extractor.out_channels, image_extractor.out_channels).to(device)
    optimizer = torch.optim.Adam([*map_to_3d.parameters(), *map_to_2d.parameters()], lr=1e-3)
    generator = subset_generator(0)
    timings: dict[str, list[float]] = {}
    pixels: list[int] = []
    for record in records:
        _, inputs = _object_inputs(load_sample(record))
        with torch.inference_mode():
            image = image_extractor.extract(inputs.rgb.unsqueeze(0))[0].float().contiguous()
            points = point_extractor.extract(inputs.xyz, inputs.valid)
        grid_2d, grid_3d, foreground = SampleFeatures(image, points, inputs).on_grid(224)
        mask = foreground.flatten()
        rows = (grid_2d.flatten(1).T[mask].to(device), grid_3d.flatten(1).T[mask].to(device))
        pixels.append(int(mask.sum()))

        def step(precision: str, fraction: float | None, pair: tuple[torch.Tensor, torch.Tensor] = rows) -> None:
            batch = [pair] if fraction is None else sample_pixels([pair], fraction, generator)
            optimizer.zero_grad()
            accumulate_batch(map_to_3d, map_to_2d, lambda a, b: (a, b), batch, 1, precision)
            optimizer.step()
            synchronize(device)

        seconds, _ = _interleaved({label: partial(step, p, f) for label, p, f in CFM_STEP_VARIANTS}, repeats)
        for label, value in seconds.items():
            timings.setdefault(label, []).append(value)
    shutil.rmtree(temp, ignore_errors=True)
    medians = {label: statistics.median(values) for label, values in timings.items()}
    reference = medians[CFM_STEP_VARIANTS[0][0]]
    return [
        f"| {label} | {device} | {statistics.median(pixels):.0f} | {medians[label] * 1000:.0f} | "
        f"{reference / medians[label]:.2f}× |"
        for label, _, _ in CFM_STEP_VARIANTS
    ]


def _speed_command(args: argparse.Namespace) -> int:
    load_at_start = os.getloadavg()[0]
    sections = [s.strip() for s in args.only.split(",")]
    summary: list[str] = []
    detail = ""
    if "coreset" in sections:
        line, _ = bench_coreset(args.coreset_rows, args.coreset_steps, args.repeats)
        summary.append(line)
        print(line, flush=True)
    if "grouping" in sections:
        summary += bench_grouping(args.points, 1024, 128, args.repeats)
        print("\n".join(summary[-2:]), flush=True)
    if "orq" in sections:
        orq_summary, orq_rows = bench_orq(args.orq_rows, 768, 4096, args.repeats, 100_000)
        summary += orq_summary
        print("\n".join(orq_summary + orq_rows), flush=True)
        detail += (
            f"\n\n#### ORQ k-means: one Lloyd iteration at {args.orq_rows:,}×768, K=4096 (median of "
            f"{args.repeats}), extrapolated to the paper's 2D fit (100,000×768, K=4096, 4 layers × 20 iterations "
            "+ 5 encoding passes, linear in rows and passes)\n\n"
            "| implementation | per iteration | rate | share of the bare product's speed | full 2D fit |\n"
            "|---|---|---|---|---|\n" + "\n".join(orq_rows)
        )
    if "kmeans" in sections:
        line, compared = bench_kmeans(args.kmeans_rows, 768, 1024, 20)
        summary.append(line)
        print(line, [round(v, 3) for v in compared], flush=True)
    if "epoch" in sections:
        epoch_rows = bench_epoch(args.preset, args.samples, args.source_size, args.repeats)
        print("\n".join(epoch_rows), flush=True)
        detail += (
            f"\n\n#### Training epoch per sample, {args.preset} (random weights), median of {args.samples} "
            "synthetic samples cropped to the object (as `bench stages`)\n\n"
            "Milliseconds. Re-extract = read + resize + both extractors + grid + step (the official CFM loop); "
            "cache before = read + resize + cache load + grid + step (a cache hit still read and resized the "
            "sample); cache after = cache load + grid + step (inputs load lazily). `step` is CFM's two MLPs, "
            "forward + backward, on the sample's foreground pixels; at 56² it stands in for Uni-RCM's grid "
            "(Uni-RCM's own network differs). The last column is the ceiling any cache can reach: "
            "re-extract / step.\n\n"
            "| preset, grid | re-extract | cache before (speed-up) | cache after (speed-up) | "
            "of which cache load + grid | step | ceiling |\n|---|---|---|---|---|---|---|\n" + "\n".join(epoch_rows)
        )
    if "cfmstep" in sections:
        step_rows = bench_cfm_step(args.preset, args.samples, args.source_size, args.repeats, args.device)
        print("\n".join(step_rows), flush=True)
        detail += (
            f"\n\n#### CFM training step per sample at the 224² grid, {args.preset} (random weights), median of "
            f"{args.samples} synthetic samples cropped to the object, {args.repeats} interleaved repeats each\n\n"
            "One image's foreground rows through both MLPs, forward + backward + Adam step, with the trainer's own "
            "`accumulate_batch` (autocast) and `sample_pixels` (the draw is timed too). The speed-up is against "
            "fp32 on all pixels in the same run.\n\n"
            "| variant | device | foreground pixels | ms per sample | speed-up |\n|---|---|---|---|---|\n"
            + "\n".join(step_rows)
        )
    command = (
        f"python -m mmiad.bench speed --repeats {args.repeats} --coreset-rows {args.coreset_rows} "
        f"--coreset-steps {args.coreset_steps} --orq-rows {args.orq_rows} --kmeans-rows {args.kmeans_rows} "
        f"--samples {args.samples} --device {args.device} --only {args.only}"
    )
    body = (
        "### Training-side algorithms: previous vs current implementation, same run\n\n"
        f"Command: `{command}`  \n"
        f"Machine: {machine_description()}; 1-minute load average {load_at_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end (above the 2 cores means other work shared them and absolute times "
        "are inflated); each pair was run interleaved "
        "on the same inputs, and the ratios are the meaningful part. The previous implementations are verbatim "
        "copies of commit 0b2669a kept in `mmiad.bench.speed`. The FPS and kNN rows are not before/after: "
        "they compare the CPU defaults (unchanged) with the new torch paths, which exist to run on an accelerator "
        "and are timed here on the CPU only because no GPU was available.\n\n"
        "| what | previous | current | speed-up | result |\n|---|---|---|---|---|\n" + "\n".join(summary) + detail
    )
    replace_section(Path(args.out), "speed", body)
    print(body)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``speed`` to ``python -m mmiad.bench``."""
    speed = commands.add_parser("speed", help="previous vs current coreset, FPS/kNN, ORQ k-means, epoch from cache")
    speed.add_argument("--out", default="BENCHMARKS.md")
    speed.add_argument("--only", default="coreset,grouping,orq,kmeans,epoch", help="comma-separated sections")
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--coreset-rows", type=int, default=125_000, help="bank rows (40 training images)")
    speed.add_argument("--coreset-steps", type=int, default=20)
    speed.add_argument("--points", type=int, default=48_000)
    speed.add_argument("--orq-rows", type=int, default=20_000)
    speed.add_argument("--kmeans-rows", type=int, default=24_576, help="whole k-means: 24 rows per code, as 100k/4096")
    speed.add_argument("--preset", default="dino-pointmae")
    speed.add_argument("--samples", type=int, default=2)
    speed.add_argument("--source-size", type=int, default=800)
    speed.add_argument("--device", default="auto", help="where the cfmstep section runs (auto, cpu, cuda, cuda:N)")
    speed.set_defaults(handler=_speed_command)
