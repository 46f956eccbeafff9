"""RAD: training-free multi-level retrieval (longkukuhi/RAD), with mmiad's optional 3D branch."""

from mmiad.methods.rad.config import RADConfig
from mmiad.methods.rad.model import RAD

__all__ = ["RAD", "RADConfig"]
