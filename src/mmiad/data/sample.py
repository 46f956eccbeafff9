"""The typed records that flow through mmiad.

Two levels keep large datasets cheap to enumerate: a :class:`SampleRecord` only holds paths and metadata (a
reader lists thousands of them instantly), and :func:`mmiad.data.formats.load_sample` turns one into a
:class:`Sample` with the arrays. Field names follow anomalib's vocabulary (``gt_mask``, ``gt_label``) where it
costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GOOD = "good"
LABEL_NORMAL = 0
LABEL_ANOMALOUS = 1
LABEL_UNKNOWN = -1


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample lives on disk and what is known about it.

    Attributes:
        rgb_path: The RGB image (PNG or any Pillow-readable format).
        xyz_path: The organized point cloud (H×W×3 float TIFF), or a depth PNG for Eyecandies.
        category: Product category (e.g. ``bagel``).
        split: ``train``, ``validation``, ``test`` or ``predict``.
        defect_type: ``good`` or the defect folder name.
        gt_path: Ground-truth mask, when present.
        label: 0 for nominal, 1 for anomalous, -1 when unknown (inference on a production line).
        extra: Format-specific facts needed to load the sample (e.g. Eyecandies camera info).
        name: The sample's name when the RGB file's stem is not it (Eyecandies: ``000`` for
            ``000_image_4.png``); None uses the RGB stem.
        format: The registered dataset format that reads it (:mod:`mmiad.data.formats`).
    """

    rgb_path: Path
    xyz_path: Path
    category: str
    split: str
    defect_type: str = GOOD
    gt_path: Path | None = None
    label: int = LABEL_NORMAL
    extra: tuple[tuple[str, str], ...] = ()
    name: str | None = None
    format: str = "mvtec3d"

    @property
    def stem(self) -> str:
        """The sample's name (``000``): the RGB file stem unless the reader set ``name``."""
        return self.name if self.name is not None else self.rgb_path.stem

    @property
    def sample_id(self) -> str:
        """A stable identifier, ``category/split/defect/stem``, used for caches and reports."""
        return f"{self.category}/{self.split}/{self.defect_type}/{self.stem}"

    def extra_dict(self) -> dict[str, str]:
        """The reader-specific facts as a dict."""
        return dict(self.extra)


@dataclass
class Sample:
    """One loaded multimodal sample at its original resolution.

    Attributes:
        rgb: H×W×3 uint8 image.
        xyz: H×W×3 float32 organized point cloud in metres; invalid points are exactly zero.
        valid: H×W bool, True where the point is valid (non-zero and finite).
        gt_mask: H×W bool ground truth (any value > 0 in the file is anomalous), or None.
        label: 0 nominal, 1 anomalous, -1 unknown.
        category: Product category.
        defect_type: ``good`` or defect name.
        record: Where the sample came from.
    """

    rgb: np.ndarray
    xyz: np.ndarray
    valid: np.ndarray
    gt_mask: np.ndarray | None
    label: int
    category: str
    defect_type: str
    record: SampleRecord | None = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the sample."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])
