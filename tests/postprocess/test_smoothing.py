from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from mmiad.postprocess.smoothing import box_cascade_smooth, pil_uint8_smooth, smooth_maps


def _delta(size: int = 81) -> torch.Tensor:
    image = torch.zeros(size, size)
    image[size // 2, size // 2] = 1.0
    return image


def test_gaussian_matches_scipy_mirror() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((48, 40)).astype(np.float32)
    ours = smooth_maps(torch.from_numpy(image), "gaussian", 4.0).numpy()
    reference = gaussian_filter(image.astype(np.float64), sigma=4.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_gaussian_of_delta_has_variance_sigma_squared() -> None:
    out = smooth_maps(_delta(), "gaussian", 4.0)
    offsets = torch.arange(81, dtype=torch.float64) - 40
    row_profile = out.sum(dim=0).double()
    assert float(row_profile.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float((row_profile * offsets**2).sum()) == pytest.approx(16.0, rel=1e-3)


def test_box_cascade_variance_is_22() -> None:
    # 5 passes of a 5-wide box add 5·(25−1)/12 = 10, 3 passes of a 7-wide box add 3·(49−1)/12 = 12.
    out = box_cascade_smooth(_delta()[None])[0]
    offsets = torch.arange(81, dtype=torch.float64) - 40
    profile = out.sum(dim=0).double()
    assert float(profile.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float((profile * offsets**2).sum()) == pytest.approx(22.0, rel=1e-4)


def test_box_cascade_zero_padding_loses_mass_at_border() -> None:
    image = torch.zeros(20, 20)
    image[0, 0] = 1.0
    assert float(box_cascade_smooth(image[None]).sum()) < 0.5


def test_pil_blur_is_quantised_and_scaled_back() -> None:
    image = torch.zeros(1, 32, 32)
    image[0, 16, 16] = 10.0
    out = pil_uint8_smooth(image, radius=2)
    values = out[0] / 10.0 * 255.0
    assert torch.allclose(values, values.round(), atol=1e-3)
    assert 0 < float(out.max()) < 10.0


def test_none_and_unknown() -> None:
    image = torch.rand(8, 8)
    assert torch.equal(smooth_maps(image, "none"), image)
    with pytest.raises(ValueError, match="unknown smoothing"):
        smooth_maps(image, "median")
