"""GLFM (hustCYQ/GLFM-Multi-class-3DAD): point-cloud-only multi-class detection; see README.md."""

from mmiad.methods.glfm.model import GLFM, GLFMConfig

__all__ = ["GLFM", "GLFMConfig"]
