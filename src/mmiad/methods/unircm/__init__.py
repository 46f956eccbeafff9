"""Uni-RCM: unified reference-guided crossmodal mapping with an offline residual quantizer (seed 000)."""

from mmiad.methods.unircm.config import UniRCMConfig
from mmiad.methods.unircm.model import UniRCM

__all__ = ["UniRCM", "UniRCMConfig"]
