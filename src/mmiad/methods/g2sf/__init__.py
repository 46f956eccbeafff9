"""G2SF: Geometry-Guided Score Fusion (Tao et al., ICCV 2025); see the package README."""

from mmiad.methods.g2sf.config import G2SFConfig
from mmiad.methods.g2sf.model import G2SF

__all__ = ["G2SF", "G2SFConfig"]
