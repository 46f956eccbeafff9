"""MuSc-V2 (Li, Xue & Zhou, TPAMI 2026): zero-shot anomaly detection by mutual scoring of an unlabeled batch.

There is no training and no model file. :meth:`MuSc.score` extracts tokens for every sample of a batch (one
category's test set, or a folder of new parts), lets them score each other (MSM, with CAE across modalities),
turns token scores into maps like the official code (2D: bilinear, align_corners=True; 3D: 3-NN interpolation to
the points then ``KNNGaussianBlur(4)``; the final map is their sum), and re-scores the image scores (max of the
map) with RsCon. Scores only mean something relative to the batch they were computed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmiad.data.errors import DataError
from mmiad.data.sample import SampleRecord
from mmiad.features.pipeline import FeaturePipeline
from mmiad.methods.base import Prediction
from mmiad.methods.musc.cae import cae_scores, patch_members
from mmiad.methods.musc.config import MuScConfig
from mmiad.methods.musc.msm import (
    BatchTooSmallError,
    MixedSizeError,
    check_batch,
    checked_subsets,
    mutual_scores,
    stack_tokens,
)
from mmiad.methods.musc.rscon import rescore
from mmiad.methods.musc.tokens import SampleTokens, extract_tokens
from mmiad.postprocess.smoothing import smooth_maps
from mmiad.utils.compute import resolve_device


class MuSc:
    """Zero-shot MuSc-V2 scorer.

    Args:
        config: Hyperparameters; keyword ``options`` build one when it is None (unknown names are errors).
        cache_dir: Where preprocessed copies go (default ``$MMIAD_CACHE``).
    """

    name = "musc"

    def __init__(self, config: MuScConfig | None = None, *, cache_dir: str | None = None, **options: Any) -> None:
        self.config = config if config is not None else MuScConfig.from_options(options)
        self.cache_dir = cache_dir
        self._pipeline: FeaturePipeline | None = None

    @property
    def pipeline(self) -> FeaturePipeline:
        """mmiad's feature pipeline for the configured extractors (the feature cache is not used: see tokens)."""
        if self._pipeline is None:
            from mmiad.features.registry import build_pipeline

            config = self.config
            self._pipeline = build_pipeline(
                config.extractors,
                profile=config.profile,
                image_size=config.image_size,
                weights_dir=config.weights_dir,
                random_init=config.random_init,
                cache_dir=self.cache_dir,
                device=config.device,
                precision=config.precision,
            )
        return self._pipeline

    def score(
        self, records: Sequence[SampleRecord], *, progress: bool = False, errors: list[DataError] | None = None
    ) -> list[Prediction]:
        """Predictions for a batch, in input order; bad samples go to ``errors`` (or raise) and are left out.

        Raises:
            BatchTooSmallError: fewer usable samples than :attr:`MuScConfig.minimum_batch` (per subset).
            MixedSizeError: samples whose token grids differ.
        """
        check_batch(len(records), self.config.interval)
        reported = len(errors) if errors is not None else 0
        prepared = self.pipeline.preprocess(records, progress=progress, errors=errors)
        tokens = []
        for record in tqdm(prepared, desc="musc tokens", disable=not progress, leave=False):
            try:
                tokens.append(extract_tokens(self.pipeline, record, self.config))
            except DataError as error:
                if errors is None:
                    raise
                errors.append(error)
        needed = self.config.minimum_batch
        if errors is not None and len(tokens) < needed <= len(records):  # bad files shrank a batch that was enough
            dropped = ", ".join(str(error.path or error) for error in errors[reported:])
            raise BatchTooSmallError(
                None,
                f"only {len(tokens)} of {len(records)} samples could be read, fewer than the {needed} mutual scoring "
                f"needs; unreadable: {dropped}",
            )
        return self.score_tokens(tokens, progress=progress)

    def score_tokens(self, tokens: Sequence[SampleTokens], *, progress: bool = False) -> list[Prediction]:
        """Mutual scoring, maps and RsCon for tokens already extracted (the part independent of extractors)."""
        config = self.config
        check_batch(len(tokens), config.interval)
        if config.modality == "2d":  # tokens extracted for both modalities can be rescored for one
            tokens = [replace(t, points=[]) for t in tokens]
        elif config.modality == "3d":
            tokens = [replace(t, image=[], grid=(0, 0)) for t in tokens]
        _check_sizes(tokens, config.allow_mixed_sizes)
        scores_2d: list[torch.Tensor] = [torch.zeros(0)] * len(tokens)
        scores_3d: list[torch.Tensor] = [torch.zeros(0)] * len(tokens)
        subsets = checked_subsets(len(tokens), config.divide_num, config.seed, config.interval)
        for subset in tqdm(subsets, desc="mutual scoring", disable=not progress or len(subsets) == 1, leave=False):
            part = [tokens[i] for i in subset]
            part_2d, part_3d = self._score_subset(part)
            for position, index in enumerate(subset):
                scores_2d[index] = part_2d[position]
                scores_3d[index] = part_3d[position]
        return self._predictions(tokens, scores_2d, scores_3d)

    def _score_subset(self, part: Sequence[SampleTokens]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per sample: 2D patch scores (L2,) and 3D group scores (G_i,), each the mean over layers.

        The mutual scoring (the O(N²) distance work) runs on the configured device; the scores come back to the
        CPU in float32 (the tokens are float32 already, so autocast does not apply).
        """
        config = self.config
        device = resolve_device(config.device)

        def stacked(tokens: list[torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor]:
            values, valid = stack_tokens(tokens, what)
            return values.to(device), valid.to(device)

        count = len(part)
        layers_2d, layers_3d = len(part[0].image), len(part[0].points)
        interval, chunk_size = config.interval, config.chunk_size
        sum_2d = sum_3d = None
        if config.modality == "both" and config.cae:
            if layers_2d != layers_3d:
                raise ValueError(f"CAE pairs layers: the 2D extractor gives {layers_2d}, the 3D one {layers_3d}")
            patches = [patch_members(t.centre_pixels, t.inputs.rgb.shape[-1], t.grid).to(device) for t in part]
            for layer in range(layers_2d):
                z2, v2 = stacked([t.image[layer] for t in part], "2D")
                z3, v3 = stacked([t.points[layer] for t in part], "3D")
                s2, s3 = cae_scores(z2, v2, z3, v3, patches, interval=interval, chunk_size=chunk_size)
                sum_2d = s2 if sum_2d is None else sum_2d + s2
                sum_3d = s3 if sum_3d is None else sum_3d + s3
        else:
            for layer in range(layers_2d):
                z2, v2 = stacked([t.image[layer] for t in part], "2D")
                s2 = mutual_scores(z2, v2, interval=interval, chunk_size=chunk_size)
                sum_2d = s2 if sum_2d is None else sum_2d + s2
            for layer in range(layers_3d):
                z3, v3 = stacked([t.points[layer] for t in part], "3D")
                s3 = mutual_scores(z3, v3, interval=interval, chunk_size=chunk_size)
                sum_3d = s3 if sum_3d is None else sum_3d + s3
        sum_2d = sum_2d.cpu() if sum_2d is not None else None
        sum_3d = sum_3d.cpu() if sum_3d is not None else None
        out_2d = [sum_2d[i] / layers_2d if sum_2d is not None else torch.zeros(0) for i in range(count)]
        out_3d = [
            sum_3d[i, : part[i].points[0].shape[0]] / layers_3d if sum_3d is not None else torch.zeros(0)
            for i in range(count)
        ]
        return out_2d, out_3d

    def _predictions(
        self, tokens: Sequence[SampleTokens], scores_2d: list[torch.Tensor], scores_3d: list[torch.Tensor]
    ) -> list[Prediction]:
        config = self.config
        size = int(tokens[0].inputs.rgb.shape[-1])
        maps_2d, maps_3d, salient = [], [], []
        for sample, s2, s3 in zip(tokens, scores_2d, scores_3d, strict=True):
            parts = []
            if sample.image:
                grid = s2.view(1, 1, *sample.grid)
                maps_2d.append(F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)[0, 0])
                parts.append(sample.image[max(0, len(sample.image) - 2)][int(torch.argmax(s2))])
            if sample.points:
                per_pixel = (s3[sample.neighbors] * sample.weights).sum(dim=1)
                flat = torch.zeros(size * size)
                flat[sample.pixel_index] = per_pixel
                maps_3d.append(flat.view(size, size))
                parts.append(sample.points[max(0, len(sample.points) - 2)][int(torch.argmax(s3))])
            salient.append(torch.cat(parts))
        if maps_3d and config.smoothing_3d != "none":
            maps_3d = list(smooth_maps(torch.stack(maps_3d), config.smoothing_3d, 4.0))
        finals = []
        for index in range(len(tokens)):
            final = torch.zeros(size, size)
            if maps_2d:
                final = final + maps_2d[index]
            if maps_3d:
                final = final + maps_3d[index]
            finals.append(final)
        image_scores = torch.stack([f.max() for f in finals])
        image_scores = rescore(image_scores, torch.stack(salient), config.rscon_k)
        predictions = []
        for index, sample in enumerate(tokens):
            inputs = sample.inputs
            assert inputs.record is not None  # set by FeaturePipeline.load_inputs, which extract_tokens reads through
            modality_maps = {}
            if maps_2d:
                modality_maps["2d"] = maps_2d[index].numpy()
            if maps_3d:
                modality_maps["3d"] = maps_3d[index].numpy()
            predictions.append(
                Prediction(
                    record=inputs.record,
                    pred_score=float(image_scores[index]),
                    anomaly_map=finals[index].numpy(),
                    label=inputs.label,
                    gt_mask=inputs.gt_mask,
                    geometry=inputs,
                    modality_maps=modality_maps,
                )
            )
        return predictions


def _check_sizes(tokens: Sequence[SampleTokens], allow_mixed: bool) -> None:
    """Refuse a batch whose samples were not imaged alike or do not share one token grid.

    Mutual scoring assumes one product seen by one camera set-up: every sample is padded to a square and resized,
    so images of different sizes end up at different scales and their patches stop being comparable. Different
    original sizes are therefore an error unless ``allow_mixed_sizes`` is set; different token grids always are.
    """
    grids = {t.grid for t in tokens} | {tuple(t.inputs.rgb.shape[-2:]) for t in tokens}
    originals = {tuple(t.inputs.original_size) for t in tokens}
    if len({t.grid for t in tokens}) > 1 or len({tuple(t.inputs.rgb.shape[-2:]) for t in tokens}) > 1:
        found = ", ".join(f"{g[0]}×{g[1]}" for g in sorted(grids))
        raise MixedSizeError(None, f"mutual scoring needs one input size and token grid per batch, found {found}")
    if len(originals) > 1 and not allow_mixed:
        found = ", ".join(f"{h}×{w}" for h, w in sorted(originals))
        raise MixedSizeError(
            None,
            f"the batch mixes image sizes ({found}); mutual scoring compares samples of one product and camera: "
            "score each size as its own batch, or set allow_mixed_sizes=true",
        )
