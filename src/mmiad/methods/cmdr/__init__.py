"""CMDR-IAD: cross-modal mapping and dual-branch reconstruction (registers ``cmdr``)."""

from mmiad.methods.cmdr.model import CMDR, CMDRConfig

__all__ = ["CMDR", "CMDRConfig"]
