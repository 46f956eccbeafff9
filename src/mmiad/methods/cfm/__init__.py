"""CFM: crossmodal feature mapping between frozen 2D and 3D features (seed 001)."""

from mmiad.methods.cfm.model import CFM, CFMConfig

__all__ = ["CFM", "CFMConfig"]
