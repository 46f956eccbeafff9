"""Texture descriptor: geometry of the output, hand-computed responses, locality and fixed standardisation."""

from __future__ import annotations

import math

import pytest
import torch

from mmiad.features.base import ImageFeatureExtractor
from mmiad.features.texture import (
    COLOUR_SCALE,
    COLOUR_SHIFT,
    ENERGY_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TextureExtractor,
)

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _normalise(image: torch.Tensor) -> torch.Tensor:
    """[0,1] RGB → the ImageNet-normalised tensor the extractor receives."""
    return (image - _MEAN) / _STD


def _textured(seed: int = 0, size: int = 64) -> torch.Tensor:
    """A smooth random colour image strictly inside (0.1, 0.85), so a 10% brightening never clips."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=generator)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return 0.1 + 0.75 * fine


def _channel(extractor: TextureExtractor, name: str) -> int:
    return extractor.channel_names().index(name)


def test_shape_protocol_and_determinism() -> None:
    extractor = TextureExtractor()
    assert isinstance(extractor, ImageFeatureExtractor)
    rgb = _normalise(torch.cat([_textured(0), _textured(1)]))
    first, second = extractor.extract(rgb), extractor.extract(rgb)
    assert first.shape == (2, extractor.out_channels, 8, 8)
    assert 32 <= extractor.out_channels <= 64
    assert torch.equal(first, second)
    assert extractor.extract(torch.zeros(1, 3, 224, 224)).shape == (1, extractor.out_channels, 28, 28)


def test_constant_image_has_exact_colour_values_and_no_energy() -> None:
    extractor = TextureExtractor()
    colour = torch.tensor([0.7, 0.4, 0.2])
    out = extractor.extract(_normalise(colour.view(1, 3, 1, 1).expand(1, 3, 32, 32).clone()))
    opponent = (
        colour.mean(),
        (colour[0] - colour[1]) / math.sqrt(2),
        (colour[0] + colour[1] - 2 * colour[2]) / math.sqrt(6),
    )
    for k in range(3):
        expected = (float(opponent[k]) - COLOUR_SHIFT[k]) / COLOUR_SCALE[k]
        torch.testing.assert_close(out[0, k], torch.full((4, 4), expected), atol=1e-4, rtol=0)
        torch.testing.assert_close(out[0, 3 + k], torch.full((4, 4), expected), atol=1e-4, rtol=0)
    assert out[0, 6:].abs().max() < 1e-3


def test_intensity_ramp_gives_the_scale_normalised_slope() -> None:
    extractor = TextureExtractor()
    slope = 0.01  # per pixel along x, in [0,1] units
    x = torch.arange(64, dtype=torch.float32)
    image = (0.15 + slope * x).view(1, 1, 1, 64).expand(1, 3, 64, 64).clone()
    out = extractor.extract(_normalise(image))
    for sigma in extractor.scales:
        along_x = out[0, _channel(extractor, f"edge_s{sigma:g}_o0"), 3:5, 3:5]  # interior cells, away from borders
        along_y = out[0, _channel(extractor, f"edge_s{sigma:g}_o2"), 3:5, 3:5]
        torch.testing.assert_close(along_x, torch.full((2, 2), sigma * slope / ENERGY_SCALE), atol=1e-3, rtol=0)
        assert along_y.abs().max() < 1e-3
        assert out[0, _channel(extractor, f"blob_bright_s{sigma:g}"), 3:5, 3:5].abs().max() < 1e-3


def test_colour_change_moves_its_own_cell_only() -> None:
    extractor = TextureExtractor()
    image = _textured(2, size=96)
    changed = image.clone()
    changed[:, 0, 16:24, 16:24] += 0.1  # redden exactly the 8×8 cell (2, 2)
    before, after = extractor.extract(_normalise(image)), extractor.extract(_normalise(changed))
    delta = (after - before).abs()[0]
    red_green = _channel(extractor, "mean_red_green")
    assert delta[red_green, 2, 2] == pytest.approx(0.1 / math.sqrt(2) / COLOUR_SCALE[1], abs=1e-4)
    elsewhere = torch.ones(12, 12, dtype=torch.bool)
    elsewhere[2, 2] = False
    assert delta[:3][:, elsewhere].max() < 1e-5  # cell means: nowhere else
    # Nothing at all changes beyond the widest support: the σ=4 branch reads 21 px around each quarter-resolution
    # pixel (two pyramid blurs and its filter), so cells from column/row 6 on (48 px onwards) cannot see the change.
    far = torch.zeros(12, 12, dtype=torch.bool)
    far[6:, :] = True
    far[:, 6:] = True
    assert delta[:, far].max() == 0.0
    assert delta[:, 3, 3].max() > 1e-3  # while the neighbouring cell does see it, through the filters


def test_ten_percent_brighter_changes_features_by_a_bounded_amount() -> None:
    extractor = TextureExtractor()
    image = _textured(3)
    base = extractor.extract(_normalise(image))
    bright = extractor.extract(_normalise(image * 1.1))
    # Everything but the colour means is positively homogeneous: exactly 10% larger.
    torch.testing.assert_close(bright[:, 6:], 1.1 * base[:, 6:], atol=1e-4, rtol=1e-4)
    # Colour means move by 10% of the (unshifted) opponent value: bounded by 0.1 × its magnitude.
    shift = torch.tensor(COLOUR_SHIFT).view(1, 3, 1, 1) / torch.tensor(COLOUR_SCALE).view(1, 3, 1, 1)
    for start in (0, 3):
        raw = base[:, start : start + 3] + shift
        torch.testing.assert_close(
            bright[:, start : start + 3], base[:, start : start + 3] + 0.1 * raw, atol=1e-4, rtol=0
        )
    relative = (bright - base).norm() / base.norm()
    assert 0.01 < relative < 0.2


def test_config_round_trip_and_bad_input() -> None:
    extractor = TextureExtractor(scales=(1.0, 2.0), orientations=6)
    config = extractor.config()
    assert config["name"] == "texture" and config["out_channels"] == extractor.out_channels
    rebuilt = TextureExtractor.from_config(config)
    assert rebuilt.config() == config
    rgb = _normalise(_textured(4, size=32))
    assert torch.equal(rebuilt.extract(rgb), extractor.extract(rgb))
    with pytest.raises(ValueError, match="multiple of the stride"):
        extractor.extract(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        extractor.extract(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="not a texture"):
        TextureExtractor.from_config({"name": "dino"})
