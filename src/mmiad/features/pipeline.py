"""From a sample record to pixel-aligned 2D and 3D feature maps, once, with caching.

Every method needs the same chain: read the files, clean the point cloud (per the method's preprocessing profile,
into a cache of preprocessed copies), resize to the model input, run the frozen 2D and 3D extractors, and align
both on a common grid. This module owns that chain so that CFM, Uni-RCM, M3DM and BTF share one implementation
and one feature cache.

The extractors run on the pipeline's device (``--device``) under its precision's autocast (``--precision``), and
the 2D extractor sees several images per forward (a GPU is starved by one 224² image at a time). Whatever the
device, features come back on the CPU in float32: the cache, the methods' feature stores and model files hold
them there, and a method that computes on a GPU moves what it needs (:meth:`PointFeatures.to`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.formats import feature_files, load_sample
from mmiad.data.preprocess import ModelInput, PreprocessProfile, prepare_input, preprocess_dataset
from mmiad.data.sample import SampleRecord
from mmiad.features.base import (
    ImageFeatureExtractor,
    PointFeatureExtractor,
    PointFeatures,
    extractor_device,
    place_extractor,
)
from mmiad.features.cache import FeatureCache
from mmiad.utils.compute import autocast, check_device_name, check_precision, resolve_device

#: Images per 2D extractor forward in :meth:`FeaturePipeline.iter_features`: enough to fill a GPU's matrix units
#: with a ViT-B/8 at 224 (785 tokens each) while 8 model inputs stay a few MB of host memory.
DEFAULT_BATCH_SIZE = 8


class SampleFeatures:
    """Frozen features of one sample plus the model input they came from.

    Attributes:
        image: C2×h×w map from the 2D extractor (28×28 for DINO ViT-B/8 at 224).
        points: Sparse 3D features and their projection onto the input grid.
        inputs: The resized model input (RGB tensor, xyz, masks, geometry for mapping back). On a cache hit it is
            read and resized only when first asked for: training from the cache never needs it (only prediction
            does, to map back to the original geometry), and reading it cost more than loading the features.
    """

    def __init__(
        self, image: torch.Tensor, points: PointFeatures, inputs: ModelInput | Callable[[], ModelInput] | None
    ) -> None:
        self.image = image
        self.points = points
        self._inputs = inputs

    @property
    def inputs(self) -> ModelInput:
        """The model input, loaded on first access when it was deferred."""
        if callable(self._inputs):
            self._inputs = self._inputs()
        return self._inputs  # type: ignore[return-value]

    def on_grid(
        self, grid: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(2D map C2×G×G, 3D map C3×G×G, foreground G×G) aligned on a G×G grid.

        The 2D map is upsampled bilinearly (align_corners=False, as the official CFM/Uni-RCM code), the 3D map
        by the official projection (:meth:`PointFeatures.to_grid`). Foreground is where the 3D map is non-zero.
        With ``device`` the upsampling and the projection run there (the features stay where they are stored),
        so an accelerator does the per-pixel work of a 224² grid; None computes where the features are.
        """
        image, points = self.image, self.points
        if device is not None:
            image, points = image.to(device), points.to(device)
        image = F.interpolate(image.unsqueeze(0).float(), size=(grid, grid), mode="bilinear", align_corners=False)
        return image[0], points.to_grid(grid), points.foreground(grid)


class FeaturePipeline:
    """Preprocessing + frozen extractors + feature cache.

    Args:
        image_extractor: Frozen 2D extractor.
        point_extractor: Frozen 3D extractor.
        profile: Offline preprocessing profile (``cfm`` keeps the RGB background, ``m3dm`` zeroes it).
        image_size: Side of the square model input (224 in the papers).
        cache: Feature cache, or None to always extract.
        preprocess_root: Where preprocessed copies of the dataset go (never the dataset itself).
        device: Where the extractors run (``auto``, ``cpu``, ``cuda``, ``cuda:N``); features come back on the
            CPU in float32 (the cache and the methods' stores hold them there). Not part of :meth:`config`: the
            device does not change what is computed beyond float rounding. Resolved on first extraction, not
            here, so that a pipeline (and a model file naming a GPU) can be built anywhere; extractors that
            cannot move (FPFH, see :class:`~mmiad.features.base.DeviceExtractor`) stay on the CPU.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for the extractors; part of :meth:`config` (and the
            cache key) when it is not fp32, since it changes the features.
    """

    def __init__(
        self,
        image_extractor: ImageFeatureExtractor,
        point_extractor: PointFeatureExtractor,
        profile: PreprocessProfile,
        image_size: int,
        cache: FeatureCache | None,
        preprocess_root: Path,
        *,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        self.device = check_device_name(device)
        self.precision = check_precision(precision)
        self.image_extractor = image_extractor
        self.point_extractor = point_extractor
        self.profile = profile
        self.image_size = image_size
        self.cache = cache
        self.preprocess_root = Path(preprocess_root)
        self._placed: tuple[str, torch.device] | None = None  # (device name, resolved device) the extractors are on

    def compute_device(self) -> torch.device:
        """The resolved :attr:`device`, moving the extractors there the first time (and after a change).

        Raises:
            ValueError: from :func:`~mmiad.utils.compute.resolve_device` for a CUDA device this machine lacks.
        """
        if self._placed is None or self._placed[0] != self.device:
            device = resolve_device(self.device)
            place_extractor(self.image_extractor, device)
            place_extractor(self.point_extractor, device)
            self._placed = (self.device, device)
        return self._placed[1]

    def config(self) -> dict[str, Any]:
        """Everything that changes the features; the feature cache keys on it."""
        config = {
            "image": self.image_extractor.config(),
            "point": self.point_extractor.config(),
            "profile": self.profile.name,
            "profile_fingerprint": self.profile.fingerprint(),
            "image_size": self.image_size,
        }
        if self.precision != "fp32":  # fp32 configs (and cache keys, model files) stay as they were
            config["precision"] = self.precision
        return config

    def preprocess(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> list[SampleRecord]:
        """Preprocessed copies of the records (reused when already in the cache); bad ones are reported."""
        prepared, found = preprocess_dataset(records, self.profile, self.preprocess_root, progress=progress)
        if found and errors is None:
            raise found[0]
        if errors is not None:
            errors.extend(found)
        return prepared

    def load_inputs(self, record: SampleRecord) -> ModelInput:
        """Read a (preprocessed) record and resize it to the model input."""
        sample = load_sample(record)
        return prepare_input(sample, size=self.image_size, rgb_pad_mode=self.profile.rgb_pad_mode)

    def extract(self, record: SampleRecord) -> SampleFeatures:
        """Features of one preprocessed record, from the cache when present (then the inputs load lazily)."""
        found = self._extract_batch([record])[0]
        if isinstance(found, DataError):
            raise found
        return found

    def _cached(self, record: SampleRecord) -> tuple[str | None, SampleFeatures | None]:
        """The record's cache key (None without a cache) and its cached features (None on a miss)."""
        if self.cache is None:
            return None, None
        files = feature_files(record)  # every file the features come from: an edited pose.txt is a new key
        try:
            key = FeatureCache.key(files, self.config())
        except OSError as error:
            culprit = next((path for path in files if not path.is_file()), files[0])
            raise DataError(culprit, f"unreadable ({error.strerror or error})") from error
        stored = self.cache.get(key, validate=self.entry_problem)
        if stored is None:
            return key, None
        points = PointFeatures.from_tensors(stored, "points")
        return key, SampleFeatures(stored["image"], points, lambda: self.load_inputs(record))

    def _extract_batch(self, records: Sequence[SampleRecord]) -> list[SampleFeatures | DataError]:
        """Features of each record, or the DataError that stopped it, in order; misses share one 2D forward.

        Cache hits are not re-extracted. The misses' images go through the 2D extractor as one batch on the
        compute device (a batched forward equals per-image ones up to float rounding); the 3D extractor takes
        one cloud at a time. Both run under the pipeline's autocast, and the features come back to the CPU in
        float32 before they are cached or returned.
        """
        return self._compute_batch(self._load_batch(records))

    def _load_batch(self, records: Sequence[SampleRecord]) -> _LoadedBatch:
        """The host-side half of :meth:`_extract_batch`: cache look-ups and reading + resizing the misses."""
        results: list[SampleFeatures | DataError | None] = []
        pending: list[tuple[int, str | None, ModelInput]] = []
        for record in records:
            try:
                key, hit = self._cached(record)
                inputs = self.load_inputs(record) if hit is None else None
            except DataError as error:
                results.append(error)
                continue
            results.append(hit)
            if inputs is not None:
                pending.append((len(results) - 1, key, inputs))
        return results, pending

    def _compute_batch(self, loaded: _LoadedBatch) -> list[SampleFeatures | DataError]:
        """The device half of :meth:`_extract_batch`: the extractors on the misses, then the cache writes."""
        results, pending = loaded
        if pending:
            images, clouds = self._run_extractors([inputs for _, _, inputs in pending])
            for (slot, key, inputs), image, points in zip(pending, images, clouds, strict=True):
                if self.cache is not None and key is not None:
                    self.cache.put(key, {"image": image, **points.to_tensors("points")})
                results[slot] = SampleFeatures(image, points, inputs)
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def _run_extractors(self, inputs: Sequence[ModelInput]) -> tuple[list[torch.Tensor], list[PointFeatures]]:
        """Both extractors over model inputs: one 2D forward for all images, one 3D extraction per cloud."""
        batch = self.image_features(torch.stack([item.rgb for item in inputs]))
        # One tensor per image (not views of the batch, which would keep the whole batch alive).
        images = [image.clone() for image in batch.unbind(0)]
        return images, [self.point_features(item.xyz, item.valid) for item in inputs]

    @contextlib.contextmanager
    def extracting(self, extractor: object) -> Iterator[torch.device]:
        """The one way to run an extractor: placed on the compute device, in inference mode, under the
        precision's autocast; yields the device the extractor is on (inputs go there)."""
        self.compute_device()
        device = extractor_device(extractor)
        with torch.inference_mode(), autocast(device, self.precision):
            yield device

    def image_features(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) model-input RGB → (B,C,h,w) CPU float32 features, computed on the device in the precision.

        Not cached: this is for callers that extract one modality outside :meth:`extract` (a modality fallback);
        they get the same features, where and in the arithmetic the pipeline was asked for.
        """
        with self.extracting(self.image_extractor):
            batch = self.image_extractor.extract(rgb)
        return batch.to(torch.device("cpu"), torch.float32)

    def point_features(self, xyz: np.ndarray, valid: np.ndarray) -> PointFeatures:
        """One organized cloud's 3D features on the CPU (float32), computed on the device in the precision.

        Not cached, like :meth:`image_features`.
        """
        with self.extracting(self.point_extractor):
            points = self.point_extractor.extract(xyz, valid)
        return _on_cpu(points)

    def entry_problem(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """What is wrong with a feature-cache entry for this pipeline, or None when it can be used as is.

        Checks every key :meth:`extract` stores, the shapes (C×h×w image features with this extractor's C, M×C
        point features, N pixel indices inside the S×S grid, N×k neighbours inside the M rows, N×k weights),
        integer index dtypes and finite values, so that a damaged or tampered entry is rebuilt instead of
        raising deep inside a method or scoring NaN.
        """
        names = ("image", "points.features", "points.pixel_index", "points.neighbors", "points.weights")
        missing = [n for n in (*names, "points.grid_size") if n not in tensors]
        if missing:
            return f"missing {', '.join(missing)}"
        image, features, index, neighbors, weights = (tensors[n] for n in names)
        grid = tensors["points.grid_size"]
        channels_2d = getattr(self.image_extractor, "out_channels", None)
        channels_3d = getattr(self.point_extractor, "out_channels", None)
        if image.ndim != 3 or channels_2d not in (None, image.shape[0]) or not image.is_floating_point():
            return f"image features of shape {tuple(image.shape)} and dtype {image.dtype}"
        if features.ndim != 2 or channels_3d not in (None, features.shape[1]):
            return f"point features of shape {tuple(features.shape)}"
        if grid.numel() != 1 or int(grid.reshape(-1)[0]) != self.image_size:
            return f"grid size {grid.tolist()} (model input {self.image_size})"
        if any(t.dtype not in (torch.int32, torch.int64) for t in (index, neighbors)):
            return "non-integer indices"
        if index.ndim != 1 or neighbors.ndim != 2 or weights.shape != neighbors.shape:
            return "inconsistent projection shapes"
        if neighbors.shape[0] != index.shape[0]:
            return "inconsistent projection shapes"
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.image_size**2):
            return "pixel indices outside the grid"
        if neighbors.numel() and (int(neighbors.min()) < 0 or int(neighbors.max()) >= features.shape[0]):
            return "neighbour indices outside the feature rows"
        for name, tensor in (("image", image), ("features", features), ("weights", weights)):
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                return f"non-finite or non-float {name}"
        return None

    def iter_features(
        self,
        records: Sequence[SampleRecord],
        *,
        progress: bool = False,
        errors: list[DataError] | None = None,
        description: str = "features",
        batch_size: int = DEFAULT_BATCH_SIZE,
        overlap: bool | None = None,
    ) -> Iterator[tuple[SampleRecord, SampleFeatures]]:
        """Features of each record, in order; a bad record is appended to ``errors`` (or raised) and skipped.

        Records are taken ``batch_size`` at a time so that the 2D extractor's forwards are batched (see
        :meth:`_extract_batch`); a bad record costs only itself. With ``overlap`` (default: when the extractors
        run on an accelerator) one worker thread reads and resizes the next batch while the device computes the
        current one; the features are the same either way.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        chunks = [records[start : start + batch_size] for start in range(0, len(records), batch_size)]
        if overlap is None:  # an accelerator should not wait for file reading; on a CPU it would only compete
            overlap = len(chunks) > 1 and self.compute_device().type != "cpu"
        with tqdm(total=len(records), desc=description, disable=not progress, leave=False) as bar:
            for chunk, found_batch in zip(chunks, self._batches(chunks, overlap), strict=True):
                for record, found in zip(chunk, found_batch, strict=True):
                    bar.update(1)
                    if isinstance(found, DataError):
                        if errors is None:
                            raise found
                        errors.append(found)
                        continue
                    yield record, found

    def _batches(
        self, chunks: Sequence[Sequence[SampleRecord]], overlap: bool
    ) -> Iterator[list[SampleFeatures | DataError]]:
        """Each chunk's results in order; with ``overlap`` the next chunk loads on a worker thread meanwhile."""
        if not overlap:
            for chunk in chunks:
                yield self._extract_batch(chunk)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmiad-read") as reader:
            upcoming: Future[_LoadedBatch] | None = reader.submit(self._load_batch, chunks[0]) if chunks else None
            for index in range(len(chunks)):
                assert upcoming is not None
                loaded = upcoming.result()
                following = index + 1
                upcoming = reader.submit(self._load_batch, chunks[following]) if following < len(chunks) else None
                yield self._compute_batch(loaded)


#: Per record: its cached features, the DataError that stopped it, or None until computed; and the misses'
#: (slot, cache key, model input) awaiting the extractors.
_LoadedBatch = tuple[list[SampleFeatures | DataError | None], list[tuple[int, str | None, ModelInput]]]


def _on_cpu(points: PointFeatures) -> PointFeatures:
    """Point features on the CPU with float32 features (what the cache stores and the methods expect)."""
    points = points.to("cpu")
    if points.features.dtype == torch.float32:
        return points
    return dataclasses.replace(points, features=points.features.float())
