from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmiad.features.checkpoints import CheckpointError
from mmiad.features.wideresnet import WideResNet50Trunk, WideResNetExtractor, load_wrn50_weights


@pytest.fixture(scope="module")
def trunk() -> WideResNet50Trunk:
    torch.manual_seed(0)
    return WideResNet50Trunk()


def test_torchvision_names_and_shapes(trunk: WideResNet50Trunk) -> None:
    state = trunk.state_dict()
    # torchvision wide_resnet50_2: bottleneck width = 2 × planes; blocks 3, 4, 6 in layers 1-3
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.conv1.weight"].shape == (128, 64, 1, 1)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.conv2.weight"].shape == (256, 256, 3, 3)
    assert state["layer3.0.downsample.1.running_var"].shape == (1024,)
    assert state["layer3.5.bn3.weight"].shape == (1024,)
    assert "layer3.6.conv1.weight" not in state and "layer2.4.conv1.weight" not in state
    assert "layer1.1.downsample.0.weight" not in state


def test_loads_torchvision_checkpoint_and_reports_bad_keys(trunk: WideResNet50Trunk, tmp_path) -> None:
    gen = torch.Generator().manual_seed(1)
    state = {
        k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in trunk.state_dict().items()
    }
    state = {k: (v.abs() + 0.5 if k.endswith("running_var") else v) for k, v in state.items()}
    full = {
        **state,
        "layer4.0.conv1.weight": torch.zeros(1),
        "fc.weight": torch.zeros(1000, 2048),
        "fc.bias": torch.zeros(1000),
    }
    path = tmp_path / "wide_resnet50_2-95faca4d.pth"
    torch.save(full, path)
    model = WideResNet50Trunk()
    load_wrn50_weights(model, path)
    assert torch.equal(model.layer2.get_submodule("3").conv3.weight, state["layer2.3.conv3.weight"])
    broken = {k: v for k, v in full.items() if k != "layer1.2.bn2.bias"}
    broken["layer9.weight"] = torch.zeros(1)
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as caught:
        load_wrn50_weights(WideResNet50Trunk(), path)
    assert caught.value.missing == ["layer1.2.bn2.bias"] and caught.value.unexpected == ["layer9.weight"]


def test_extractor_output_is_pooled_concat(trunk: WideResNet50Trunk) -> None:
    extractor = WideResNetExtractor(trunk, "random-0")
    rgb = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = extractor.extract(rgb)
    assert out.shape == (2, 1536, 28, 28)
    with torch.no_grad():
        layer2, layer3 = trunk.eval()(rgb)
    assert layer2.shape[-1] == 8 and layer3.shape[-1] == 4  # strides 8 and 16
    expected = torch.cat([F.adaptive_avg_pool2d(F.avg_pool2d(m, 3, stride=1), 28) for m in (layer2, layer3)], dim=1)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError):
        extractor.extract(torch.zeros(1, 4, 64, 64))
