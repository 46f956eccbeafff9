from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmiad.features.base import PointFeatures, feature_points, identity_point_features


def _features() -> PointFeatures:
    # Two group features on a 4×4 grid; pixels 5 and 10 blend them with hand-picked weights.
    return PointFeatures(
        features=torch.tensor([[1.0, 10.0], [3.0, 30.0]]),
        pixel_index=torch.tensor([5, 10]),
        neighbors=torch.tensor([[0, 1], [1, 0]]),
        weights=torch.tensor([[0.75, 0.25], [0.5, 0.5]]),
        grid_size=4,
    )


def test_dense_blends_neighbours_at_valid_pixels_only() -> None:
    dense = _features().dense()
    assert dense.shape == (2, 4, 4)
    assert dense[:, 1, 1].tolist() == [1.5, 15.0]  # 0.75·1 + 0.25·3, 0.75·10 + 0.25·30
    assert dense[:, 2, 2].tolist() == [2.0, 20.0]
    assert float(dense.abs().sum()) == 1.5 + 15 + 2 + 20


def test_to_grid_is_unpadded_average_pool_then_adaptive_pool() -> None:
    features = _features()
    expected = F.adaptive_avg_pool2d(F.avg_pool2d(features.dense()[None], 3, stride=1), 3)[0]
    assert torch.allclose(features.to_grid(3), expected)
    # 4×4 → 2×2 after the 3×3 pooling: the top-left output averages rows/cols 0–2, which hold both pixels.
    assert torch.allclose(features.to_grid(2)[:, 0, 0], torch.tensor([3.5 / 9, 35 / 9]))
    assert features.foreground(2).tolist() == [[True, True], [True, True]]


def test_tensor_round_trip_and_identity_features() -> None:
    features = _features()
    back = PointFeatures.from_tensors(features.to_tensors("p"), "p")
    assert torch.equal(back.dense(), features.dense()) and back.grid_size == 4
    valid = np.zeros((3, 3), bool)
    valid[0, 1] = valid[2, 2] = True
    identity = identity_point_features(torch.tensor([[1.0], [2.0]]), valid)
    assert identity.dense()[0].tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 2]]


def test_feature_points_all_rule_drops_points_on_a_coordinate_plane_any_rule_keeps_them() -> None:
    xyz = np.array(
        [[[0.1, 0.2, 0.5], [0.0, 0.2, 0.5], [0.1, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.3, 0.1, 0.4], [0.1, 0.1, 0.0]]]
    )
    valid = np.array([[True, True, True], [True, False, True]])
    assert feature_points(xyz, valid, "all").tolist() == [[True, False, False], [False, False, False]]
    assert feature_points(xyz, valid, "any").tolist() == [[True, True, True], [False, False, True]]
    with pytest.raises(ValueError, match="nonzero"):
        feature_points(xyz, valid, "some")
