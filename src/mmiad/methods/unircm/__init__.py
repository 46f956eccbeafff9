"""Uni-RCM: unified reference-guided crossmodal mapping with an offline residual quantizer (seed 000)."""

from mmiad.methods.unircm.model import UniRCM, UniRCMConfig

__all__ = ["UniRCM", "UniRCMConfig"]
