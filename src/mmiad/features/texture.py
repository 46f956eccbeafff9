"""Weight-free 2D features: local colour statistics plus a multi-scale Gaussian-derivative filter bank.

This stands in for DINO where no weights can be downloaded. Its output has DINO's geometry (stride 8: 28×28 at
224) so every method runs unchanged. The design follows what the crossmodal methods need from a 2D descriptor:

* Colour is kept strong and local. CFM predicts the 2D feature from the local 3D geometry and flags the pixels
  where the prediction fails, so a discoloured defect must move the features of its own cell. Colour is therefore
  encoded in an opponent space (intensity, red–green, yellow–blue), averaged over each 8×8 cell and a 24×24
  context, plus its within-cell spread.
* Texture and shading come from scale-normalised Gaussian derivatives of intensity at several scales: oriented
  first-derivative energies (edges), the positive and negative halves of the Laplacian (bright and dark blobs), and
  second-derivative energies (ridges), plus chromatic edge strength. Energies are rectified and cell-averaged.
* Standardisation uses fixed constants (see ``COLOUR_SHIFT``, ``COLOUR_SCALE``, ``ENERGY_SCALE``), never
  per-image statistics, which would normalise away exactly the global colour shifts that are anomalies.

Every channel except the colour means is positively homogeneous in the image values, so a global brightness change
of 10% changes those channels by exactly 10%.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mmiad.features.registry import register_image_extractor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Opponent colour space: intensity, red–green, yellow–blue (orthogonal rows, the chromatic ones zero-mean).
_OPPONENT = (
    (1 / 3, 1 / 3, 1 / 3),
    (1 / math.sqrt(2), -1 / math.sqrt(2), 0.0),
    (1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)),
)
# Fixed standardisation. Shifts: the ImageNet mean colour mapped into opponent space. Scales: the ImageNet spread of
# intensity (0.226) and a typical chromatic spread (0.06, natural colours are far less saturated than they are
# bright). Using a smaller chromatic scale deliberately amplifies colour differences, which carry many defects.
COLOUR_SHIFT = (
    sum(IMAGENET_MEAN) / 3,
    (IMAGENET_MEAN[0] - IMAGENET_MEAN[1]) / math.sqrt(2),
    (IMAGENET_MEAN[0] + IMAGENET_MEAN[1] - 2 * IMAGENET_MEAN[2]) / math.sqrt(6),
)
COLOUR_SCALE = (0.226, 0.06, 0.06)
# Energies (local spreads, scale-normalised derivative magnitudes) are non-negative contrasts in [0, 1] units; a
# contrast of 0.05 (a faint but visible edge) maps to 1.
ENERGY_SCALE = 0.05
_OPPONENT_NAMES = ("intensity", "red_green", "yellow_blue")


def _gaussian_kernels(sigma: float, norm_sigma: float) -> torch.Tensor:
    """3×K 1-D correlation kernels: the Gaussian and its first and second derivatives, scale-normalised.

    The discrete kernels are corrected so that the Gaussian sums to 1, a unit ramp gives exactly 1 through the first
    derivative and a unit parabola x²/2 exactly 1 through the second (which ignores constants). Multiplying by the
    total blur ``norm_sigma`` and its square (Lindeberg's scale normalisation) makes an edge of a given contrast
    respond equally at every scale and pyramid level.
    """
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    d1 = x * g
    d1 = d1 / (x * d1).sum()
    d2 = (x**2 / sigma**2 - 1) * g
    d2 = d2 - d2.mean()
    d2 = d2 / (0.5 * (x**2 * d2).sum())
    return torch.stack([g, norm_sigma * d1, norm_sigma**2 * d2])


class TextureExtractor:
    """Colour plus Gaussian-derivative texture descriptor, an :class:`~mmiad.features.base.ImageFeatureExtractor`.

    Args:
        scales: Gaussian scales (pixels at the input resolution) of the filter bank.
        orientations: Number of orientations of the first-derivative energies.
        stride: Output stride; 8 matches DINO ViT-B/8 (28×28 at 224).
    """

    def __init__(self, scales: tuple[float, ...] = (1.0, 2.0, 4.0), orientations: int = 4, stride: int = 8) -> None:
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"scales must be a non-empty tuple of positive numbers, got {scales!r}")
        if orientations < 2:
            raise ValueError(f"orientations must be at least 2, got {orientations}")
        if stride < 1:
            raise ValueError(f"stride must be positive, got {stride}")
        self.scales = tuple(float(s) for s in scales)
        self.orientations = int(orientations)
        self.stride = int(stride)
        self._names = self._channel_names()
        self.out_channels = len(self._names)
        # Coarse scales run on a Gaussian pyramid (blur σ=1, keep every second pixel): σ=2 and σ=4 become σ≈1 at
        # half and quarter resolution, which costs a fraction of full-resolution filtering. Each level carries a
        # known blur (0.5, then √(0.5²+1)/2 …, in its own pixels) that the level's filter tops up to exactly σ/2^l.
        max_level = int(math.log2(self.stride))
        self._plan = []
        for sigma in self.scales:
            level = min(max_level, max(0, math.floor(math.log2(sigma))))
            carried = 0.0
            for _ in range(level):
                carried = math.sqrt(carried**2 + 1.0) / 2
            target = sigma / 2**level
            self._plan.append((level, math.sqrt(max(target**2 - carried**2, 0.25)), target))
        self._matrices: dict[tuple[int, float, float], torch.Tensor] = {}
        self._device = torch.device("cpu")
        self._opponent = torch.tensor(_OPPONENT, dtype=torch.float32)
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)

    def _channel_names(self) -> list[str]:
        names = [f"mean_{c}" for c in _OPPONENT_NAMES]
        names += [f"context_{c}" for c in _OPPONENT_NAMES]
        names += [f"spread_{c}" for c in _OPPONENT_NAMES]
        for s in self.scales:
            names += [f"edge_s{s:g}_o{k}" for k in range(self.orientations)]
            names += [f"blob_bright_s{s:g}", f"blob_dark_s{s:g}"]
            names += [f"ridge_xx_s{s:g}", f"ridge_yy_s{s:g}", f"ridge_xy_s{s:g}"]
            names += [f"colour_edge_rg_s{s:g}", f"colour_edge_yb_s{s:g}"]
        return names

    def channel_names(self) -> list[str]:
        """One name per output channel, in order (colour channels first)."""
        return list(self._names)

    def config(self) -> dict[str, Any]:
        """Name and parameters; the constants are part of the code version, not of the config."""
        return {
            "name": "texture",
            "scales": list(self.scales),
            "orientations": self.orientations,
            "stride": self.stride,
            "out_channels": self.out_channels,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TextureExtractor:
        """Rebuild an extractor from :meth:`config` (extra keys such as the name are checked, not passed)."""
        if config.get("name") != "texture":
            raise ValueError(f"not a texture extractor config: {config!r}")
        return cls(scales=tuple(config["scales"]), orientations=config["orientations"], stride=config["stride"])

    @property
    def device(self) -> torch.device:
        """Where the descriptor computes (its constants and cached filter matrices are there)."""
        return self._device

    def to(self, device: torch.device | str) -> TextureExtractor:
        """Move the constants and the cached filter matrices to ``device``; returns self.

        The descriptor is plain tensor code (matrix products and pooling), so it runs wherever its constants are.
        """
        self._device = torch.device(device)
        self._opponent, self._mean, self._std = (t.to(self._device) for t in (self._opponent, self._mean, self._std))
        self._matrices = {key: mats.to(self._device) for key, mats in self._matrices.items()}
        return self

    def _filter_matrices(self, size: int, sigma: float, norm_sigma: float) -> torch.Tensor:
        """3×size×size matrices M with (x @ M) = correlation of rows of x with G, G′, G″, edges replicated.

        A 1-D filter along an axis of a 224-pixel image is one small dense matrix product, which BLAS runs many
        times faster than torch's grouped depthwise convolutions on a CPU.
        """
        size = int(size)  # under ONNX tracing a shape is a tensor; the cache must key on the plain number
        key = (size, sigma, norm_sigma)
        if key not in self._matrices:
            kernels = _gaussian_kernels(sigma, norm_sigma)
            radius = kernels.shape[1] // 2
            out = torch.arange(size).view(1, -1)
            taps = torch.arange(-radius, radius + 1).view(-1, 1)
            source = (out + taps).clamp(0, size - 1)  # K×size: which input each tap of each output reads
            mats = torch.zeros(3, size, size, dtype=torch.float64)
            for j in range(3):
                weights = kernels[j].view(-1, 1).expand_as(source)
                mats[j].index_put_((source.reshape(-1), out.expand_as(source).reshape(-1)), weights.reshape(-1), True)
            self._matrices[key] = mats.float() if self._device.type == "cpu" else mats.float().to(self._device)
        return self._matrices[key]

    def _downsample(self, image: torch.Tensor) -> torch.Tensor:
        """One pyramid step: Gaussian blur σ=1, then every second pixel (both folded into one matrix per axis)."""
        height, width = image.shape[-2:]
        mx = self._filter_matrices(width, 1.0, 1.0)[0][:, ::2]
        my = self._filter_matrices(height, 1.0, 1.0)[0][:, ::2].T
        return my @ (image @ mx)

    def _derivatives(self, opp: torch.Tensor, sigma: float, norm_sigma: float) -> dict[str, torch.Tensor]:
        """Separable Gaussian derivatives: ∂x, ∂y of all opponent channels, ∂xx, ∂yy, ∂xy of intensity."""
        height, width = opp.shape[-2:]
        mx = self._filter_matrices(width, sigma, norm_sigma)
        my = self._filter_matrices(height, sigma, norm_sigma).transpose(1, 2)  # left-multiplying filters columns
        g, d = opp @ mx[0], opp @ mx[1]
        intensity = opp[:, :1]
        return {
            "dx": my[0] @ d,
            "dy": my[1] @ g,
            "dxx": my[0] @ (intensity @ mx[2]),
            "dyy": my[2] @ g[:, :1],
            "dxy": my[1] @ d[:, :1],
        }

    @torch.no_grad()
    def extract(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) ImageNet-normalised RGB on any device → (B,C,S/stride,S/stride) features on :attr:`device`."""
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"rgb must be a (B,3,H,W) tensor, got shape {tuple(rgb.shape)}")
        height, width = rgb.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(f"image size {height}×{width} is not a multiple of the stride {self.stride}")
        if rgb.device != self._device:  # a Python test, so an ONNX trace on the CPU records no copy
            rgb = rgb.to(self._device)
        image = (rgb.float() * self._std + self._mean).clamp(0.0, 1.0)
        opp = torch.einsum("oc,bchw->bohw", self._opponent, image)
        s = self.stride

        def pool(x: torch.Tensor, level: int = 0) -> torch.Tensor:
            return F.avg_pool2d(x, s >> level, s >> level)

        mean = pool(opp)
        context = F.avg_pool2d(opp, 3 * s, s, padding=s, count_include_pad=False)
        # Deviations from the cell mean, not E[x²] − E[x]², which cancels badly in float32 on flat cells.
        cell_mean = mean.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
        spread = pool((opp - cell_mean).square()).sqrt()
        shift = torch.tensor(COLOUR_SHIFT, device=self._device).view(1, 3, 1, 1)
        scale = torch.tensor(COLOUR_SCALE, device=self._device).view(1, 3, 1, 1)
        parts = [(mean - shift) / scale, (context - shift) / scale, spread / ENERGY_SCALE]

        angles = torch.arange(self.orientations, dtype=torch.float32, device=self._device) * math.pi / self.orientations
        pyramid = [opp]
        for level, sigma, norm_sigma in self._plan:
            while len(pyramid) <= level:
                pyramid.append(self._downsample(pyramid[-1]))
            der = self._derivatives(pyramid[level], sigma, norm_sigma)
            ix, iy = der["dx"][:, :1], der["dy"][:, :1]
            edges = (torch.cos(angles).view(1, -1, 1, 1) * ix + torch.sin(angles).view(1, -1, 1, 1) * iy).abs()
            laplacian = der["dxx"] + der["dyy"]
            colour_edges = der["dx"][:, 1:].square() + der["dy"][:, 1:].square()
            energies = (
                edges,
                laplacian.clamp_min(0.0),
                laplacian.neg().clamp_min_(0.0),
                der["dxx"].abs(),
                der["dyy"].abs(),
                der["dxy"].abs(),
                colour_edges.sqrt_(),
            )
            parts += [pool(e, level) / ENERGY_SCALE for e in energies]
        return torch.cat(parts, dim=1)


def _build_texture(**_: Any) -> TextureExtractor:
    """Registry factory: the texture descriptor has no weights, so the options do not apply."""
    return TextureExtractor()


register_image_extractor(
    "texture", _build_texture, "colour + multi-scale filter bank (42-d, stride 8); no weights", needs_weights=False
)
