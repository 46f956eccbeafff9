"""mmiad: unsupervised multimodal (RGB + 3D point cloud) industrial anomaly detection."""

from __future__ import annotations

__version__ = "0.1.0"
