"""From training records to the fusion set: synthesise pseudo-anomalies, extract, look up the banks, label.

The samples are synthesised on mmiad's preprocessed copies (read through the pipeline, resized to the model
input) and, when the model has a cache folder, written there (``<cache>/g2sf/pseudo/<category>/NNNN.npz``:
RGB uint8, xyz float32, mask bool) for inspection, as the official code keeps ``rgb/``, ``xyz/`` and ``gt/``
copies. The user's dataset is only ever read.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from mmiad.data.preprocess.transforms import IMAGENET_MEAN, IMAGENET_STD
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import FeaturePipeline, SampleFeatures
from mmiad.methods.g2sf.banks import UnimodalBanks, patch_rows
from mmiad.methods.g2sf.config import G2SFConfig
from mmiad.methods.g2sf.perlin import resize_nearest
from mmiad.methods.g2sf.synthesis import Sample, synthesise
from mmiad.methods.g2sf.training import FusionSet
from mmiad.utils.atomic import write_bytes

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)
#: Draws per requested sample before giving up (a base whose mask never fits is redrawn).
MAX_DRAWS = 20


def to_sample(rgb: torch.Tensor, xyz: np.ndarray) -> Sample:
    """ImageNet-normalised (3,S,S) RGB → [0,255] S×S×3, with its cloud."""
    array = rgb.permute(1, 2, 0).numpy() * _STD + _MEAN
    return Sample(np.clip(array * 255.0, 0, 255).astype(np.float32), np.asarray(xyz, dtype=np.float32))


def to_model_rgb(sample: Sample) -> torch.Tensor:
    """[0,255] S×S×3 → ImageNet-normalised (3,S,S) float32."""
    return torch.from_numpy(((sample.rgb / 255.0 - _MEAN) / _STD).astype(np.float32)).permute(2, 0, 1).contiguous()


def patch_labels(mask: np.ndarray, grid: int) -> torch.Tensor:
    """grid² bool: the mask dilated 3×3, nearest-resized to the grid, non-zero (``FusionDataCollector``)."""
    dilated = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
    return torch.from_numpy(resize_nearest(dilated, grid).reshape(-1).copy())


def pick_sources(
    records_by_category: dict[str, Sequence[SampleRecord]], per_category: int | None, seed: int
) -> list[SampleRecord]:
    """The anomaly-source list (``create_anomaly_source.py``): per category, shuffled, the first few (None: 8, or
    24 for Eyecandies, the official counts)."""
    rng = np.random.default_rng(seed)
    chosen: list[SampleRecord] = []
    for category in sorted(records_by_category):
        records = list(records_by_category[category])
        count = per_category
        if count is None:
            count = 24 if records and records[0].format == "eyecandies" else 8
        order = rng.permutation(len(records))
        chosen.extend(records[int(i)] for i in order[:count])
    return chosen


def _save(folder: Path, index: int, sample: Sample, mask: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, rgb=np.round(sample.rgb).astype(np.uint8), xyz=sample.xyz, mask=mask)
    write_bytes(folder / f"{index:04d}.npz", buffer.getvalue())


def build_fusion_set(
    pipeline: FeaturePipeline,
    banks: UnimodalBanks,
    config: G2SFConfig,
    train: Sequence[SampleRecord],
    sources: Sequence[SampleRecord],
    *,
    save_dir: Path | None = None,
    progress: bool = False,
) -> tuple[FusionSet, dict[str, int]]:
    """``n_anomalies`` pseudo samples → foreground patch rows with their neighbours and labels.

    ``train`` are the category's preprocessed training records (bases and RGB sources), ``sources`` the
    preprocessed 3D sources. Returns the set and counts (samples, redraws, patches, anomalous patches).
    """
    rng = np.random.default_rng(config.seed)
    fmt = train[0].format
    category = train[0].category
    features, distances, indices, labels = [], [], [], []
    redraws = 0
    pending: list[tuple[Sample, np.ndarray]] = []

    def flush() -> None:
        images = pipeline.image_features(torch.stack([to_model_rgb(s) for s, _ in pending]))
        for (sample, mask), image in zip(pending, images, strict=True):
            valid = np.any(sample.xyz != 0, axis=-1)
            points = pipeline.point_features(sample.xyz, valid)
            rows = patch_rows(SampleFeatures(image, points, None), config.rgb_grid, config.point_grid)
            found = banks.neighbours(rows, config.top_k)
            keep = ~found.background
            features.append(found.features[keep])
            distances.append(found.distances[keep])
            indices.append(found.indices[keep])
            labels.append(torch.where(patch_labels(mask, config.point_grid)[keep], -1, 1))
        pending.clear()

    for index in tqdm(range(config.n_anomalies), desc="pseudo anomalies", disable=not progress, leave=False):
        for _ in range(MAX_DRAWS):
            base_i = int(rng.integers(len(train)))
            others = [i for i in range(len(train)) if i != base_i] or [base_i]
            source_record = sources[int(rng.integers(len(sources)))]
            base_in = pipeline.load_inputs(train[base_i])
            rgb_in = pipeline.load_inputs(train[int(rng.choice(others))])
            xyz_source = pipeline.load_inputs(source_record).xyz
            threshold = (
                0.3
                if fmt == "eyecandies"
                and ("Cane" in str(source_record.xyz_path) or "Loll" in str(source_record.xyz_path))
                else 0.4
            )
            made = synthesise(
                to_sample(base_in.rgb, base_in.xyz),
                to_sample(rgb_in.rgb, rgb_in.xyz),
                xyz_source,
                rng,
                fmt=fmt,
                category=category,
                z_offset=config.z_offset,
                keep_last_component=config.keep_last_component,
                full_bbox=config.full_bbox,
                threshold=threshold,
            )
            if made is not None and patch_labels(made[1], config.point_grid).any():
                break
            redraws += 1
        else:
            raise ValueError(f"no pseudo-anomaly could be placed on {category} after {MAX_DRAWS} draws")
        sample, mask = made
        if save_dir is not None:
            _save(save_dir, index, sample, mask)
        pending.append((sample, mask))
        if len(pending) == 8:
            flush()
    if pending:
        flush()
    data = FusionSet(torch.cat(features), torch.cat(distances), torch.cat(indices), torch.cat(labels))
    counts = {
        "samples": config.n_anomalies,
        "redraws": redraws,
        "patches": len(data),
        "anomalous_patches": int((data.labels == -1).sum()),
    }
    return data, counts
