"""Wide-ResNet-50-2, layers 2 and 3: BTF's RGB backbone, written in-house so no torchvision/timm is needed.

BTF (3D-ADS) takes timm's ``wide_resnet50_2`` with ``features_only=True, out_indices=(2, 3)`` (layer2: 512
channels at stride 8, layer3: 1024 channels at stride 16), passes each map through ``AvgPool2d(3, stride=1)``
without padding (a local neighbourhood aggregation, as PatchCore), resizes both with ``AdaptiveAvgPool2d(28)`` and
concatenates them: 1536 channels on a 28×28 grid. The module names follow torchvision's ``wide_resnet50_2`` (the
same as timm's), so the released ImageNet checkpoint loads strictly; layer4 and the classifier are known and
ignored. BatchNorm always runs in eval mode: the backbone is frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from mmiad.features.checkpoints import load_strict, read_checkpoint, strip_prefixes, unwrap_state_dict
from mmiad.features.registry import register_image_extractor

OUT_GRID = 28
WIDTH_FACTOR = 2  # "wide": bottleneck width 128 per group instead of 64
EXPANSION = 4
BLOCKS = (3, 4, 6)  # layer1..layer3 of ResNet-50


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck (stride on the 3×3 conv), with its parameter names."""

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        width = planes * WIDTH_FACTOR
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class WideResNet50Trunk(nn.Module):
    """Stem + layer1..layer3 of Wide-ResNet-50-2; ``forward`` returns (layer2, layer3) maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for index, (count, planes) in enumerate(zip(BLOCKS, (64, 128, 256), strict=True), start=1):
            blocks = []
            for block in range(count):
                blocks.append(Bottleneck(channels, planes, stride=2 if block == 0 and index > 1 else 1))
                channels = planes * EXPANSION
            setattr(self, f"layer{index}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        layer1, layer2, layer3 = (cast(nn.Sequential, getattr(self, f"layer{i}")) for i in (1, 2, 3))
        second = layer2(layer1(x))
        return second, layer3(second)


def _unused(key: str) -> bool:
    """Checkpoint keys deliberately not loaded: layer4 and the ImageNet classifier."""
    return key.startswith(("layer4.", "fc."))


def load_wrn50_weights(model: WideResNet50Trunk, path: str | Path) -> None:
    """Load torchvision's ``wide_resnet50_2-*.pth`` or timm's ``model.safetensors`` strictly.

    Raises:
        CheckpointError: Listing missing, unexpected and mis-shaped keys.
    """
    state = strip_prefixes(unwrap_state_dict(read_checkpoint(path)), ("module.",))
    load_strict(
        model,
        state,
        path=path,
        ignore_unexpected=_unused,
        ignore_missing=lambda key: key.endswith("num_batches_tracked"),
    )


class WideResNetExtractor:
    """:class:`~mmiad.features.base.ImageFeatureExtractor`: (B,3,S,S) → (B,1536,28,28), BTF's RGB features.

    Attributes:
        out_channels: 1536 (512 from layer2 + 1024 from layer3).
        weights_id: SHA-256 of the weights file, or ``random-<seed>``.
    """

    out_channels = 512 + 1024

    def __init__(self, model: WideResNet50Trunk, weights_id: str, out_grid: int = OUT_GRID) -> None:
        self.model = model.eval().requires_grad_(False)
        self.weights_id = weights_id
        self.out_grid = out_grid

    def config(self) -> dict[str, Any]:
        """Everything that changes the features."""
        return {"kind": "wide_resnet50_2", "layers": [2, 3], "grid": self.out_grid, "weights": self.weights_id}

    @property
    def device(self) -> torch.device:
        """Where the trunk's weights are, hence where it computes."""
        return self.model.conv1.weight.device

    def to(self, device: torch.device | str) -> WideResNetExtractor:
        """Move the trunk to ``device`` (see :class:`~mmiad.features.base.DeviceExtractor`); returns self."""
        self.model.to(device)
        return self

    def extract(self, rgb: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (B,3,S,S) float RGB on any device → (B,1536,28,28) on :attr:`device`.

        Float32 unless the caller runs it under a low-precision autocast.
        """
        if not isinstance(rgb, torch.Tensor) or rgb.ndim != 4 or rgb.shape[1] != 3 or not rgb.is_floating_point():
            shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
            raise ValueError(f"expected a float RGB batch of shape (B,3,H,W), got {shape}")
        self.model.eval()
        with torch.inference_mode():
            maps = []
            for feature in self.model(rgb.to(self.device, torch.float32)):
                if min(feature.shape[-2:]) >= 3:
                    feature = F.avg_pool2d(feature, kernel_size=3, stride=1)
                maps.append(F.adaptive_avg_pool2d(feature, self.out_grid))
            out = torch.cat(maps, dim=1)
        return out.clone()


def build_wrn50_extractor(
    *, weights_dir: str | Path | None = None, random_init: bool = False, seed: int = 0
) -> WideResNetExtractor:
    """The ``wrn50`` image extractor, loaded from the weights folder (or seeded random weights for tests)."""
    from mmiad.features import weights as weights_module

    if random_init:
        weights_module._random_init_warning("wrn50", seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = WideResNet50Trunk()
        return WideResNetExtractor(model, f"random-{seed}")
    path = weights_module.resolve_weights("wide_resnet50_2", weights_dir)
    model = WideResNet50Trunk()
    load_wrn50_weights(model, path)
    return WideResNetExtractor(model, weights_module._weights_id(path))


register_image_extractor(
    "wrn50", build_wrn50_extractor, "Wide-ResNet-50-2 layers 2+3 (BTF's backbone, 1536-d)", needs_weights=True
)
