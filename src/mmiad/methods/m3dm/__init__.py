"""M3DM: three PatchCore banks (RGB, point, UFF-fused) with decision-layer fusion."""

from mmiad.methods.m3dm.config import M3DMConfig
from mmiad.methods.m3dm.fusion import FeatureFusionBlock
from mmiad.methods.m3dm.model import M3DM
from mmiad.methods.m3dm.patches import patch_sets

__all__ = ["M3DM", "FeatureFusionBlock", "M3DMConfig", "patch_sets"]
