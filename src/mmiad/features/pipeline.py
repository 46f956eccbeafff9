"""From a sample record to pixel-aligned 2D and 3D feature maps, once, with caching.

Every method needs the same chain: read the files, clean the point cloud (per the method's preprocessing profile,
into a cache of preprocessed copies), resize to the model input, run the frozen 2D and 3D extractors, and align
both on a common grid. This module owns that chain so that CFM, Uni-RCM, M3DM and BTF share one implementation
and one feature cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.formats import load_sample
from mmiad.data.preprocess import ModelInput, PreprocessProfile, prepare_input, preprocess_dataset
from mmiad.data.sample import SampleRecord
from mmiad.features.base import ImageFeatureExtractor, PointFeatureExtractor, PointFeatures
from mmiad.features.cache import FeatureCache


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

    def on_grid(self, grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(2D map C2×G×G, 3D map C3×G×G, foreground G×G) aligned on a G×G grid.

        The 2D map is upsampled bilinearly (align_corners=False, as the official CFM/Uni-RCM code), the 3D map
        by the official projection (:meth:`PointFeatures.to_grid`). Foreground is where the 3D map is non-zero.
        """
        image = F.interpolate(self.image.unsqueeze(0).float(), size=(grid, grid), mode="bilinear", align_corners=False)
        return image[0], self.points.to_grid(grid), self.points.foreground(grid)


class FeaturePipeline:
    """Preprocessing + frozen extractors + feature cache.

    Args:
        image_extractor: Frozen 2D extractor.
        point_extractor: Frozen 3D extractor.
        profile: Offline preprocessing profile (``cfm`` keeps the RGB background, ``m3dm`` zeroes it).
        image_size: Side of the square model input (224 in the papers).
        cache: Feature cache, or None to always extract.
        preprocess_root: Where preprocessed copies of the dataset go (never the dataset itself).
    """

    def __init__(
        self,
        image_extractor: ImageFeatureExtractor,
        point_extractor: PointFeatureExtractor,
        profile: PreprocessProfile,
        image_size: int,
        cache: FeatureCache | None,
        preprocess_root: Path,
    ) -> None:
        self.image_extractor = image_extractor
        self.point_extractor = point_extractor
        self.profile = profile
        self.image_size = image_size
        self.cache = cache
        self.preprocess_root = Path(preprocess_root)

    def config(self) -> dict[str, Any]:
        """Everything that changes the features; the feature cache keys on it."""
        return {
            "image": self.image_extractor.config(),
            "point": self.point_extractor.config(),
            "profile": self.profile.name,
            "profile_fingerprint": self.profile.fingerprint(),
            "image_size": self.image_size,
        }

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
        key = None
        if self.cache is not None:
            files = [record.rgb_path, record.xyz_path]
            key = FeatureCache.key(files, self.config())
            stored = self.cache.get(key)
            if stored is not None:
                points = PointFeatures.from_tensors(stored, "points")
                return SampleFeatures(stored["image"], points, lambda: self.load_inputs(record))
        inputs = self.load_inputs(record)
        with torch.inference_mode():
            image = self.image_extractor.extract(inputs.rgb.unsqueeze(0))[0].float().contiguous()
            points = self.point_extractor.extract(inputs.xyz, inputs.valid)
        if self.cache is not None and key is not None:
            self.cache.put(key, {"image": image, **points.to_tensors("points")})
        return SampleFeatures(image, points, inputs)

    def iter_features(
        self,
        records: Sequence[SampleRecord],
        *,
        progress: bool = False,
        errors: list[DataError] | None = None,
        description: str = "features",
    ) -> Iterator[tuple[SampleRecord, SampleFeatures]]:
        """Features of each record; a bad record is appended to ``errors`` (or raised) and skipped."""
        for record in tqdm(records, desc=description, disable=not progress, leave=False):
            try:
                yield record, self.extract(record)
            except DataError as error:
                if errors is None:
                    raise
                errors.append(error)
