"""CIF's settings: the official published configuration (``scripts/train.sh``, ``scripts/eval.sh``) by default."""

from __future__ import annotations

from dataclasses import dataclass

from mmiad.methods.cif.foreground import FOREGROUND_RULES
from mmiad.methods.settings import MethodSettings
from mmiad.postprocess.smoothing import SMOOTHINGS

#: K per dataset format when ``n_clusters`` is None (official scripts: 4 for MVTec 3D-AD, 8 for Eyecandies).
DEFAULT_CLUSTERS = {"eyecandies": 8}
FALLBACK_CLUSTERS = 4


def clusters_for(record_format: str, n_clusters: int | None) -> int:
    """K for a dataset format: ``n_clusters`` when set, else the official per-dataset value (4 otherwise)."""
    return n_clusters if n_clusters is not None else DEFAULT_CLUSTERS.get(record_format, FALLBACK_CLUSTERS)


@dataclass
class CIFConfig(MethodSettings):
    """CIF hyperparameters (Sunny5250/CIF at 51b7ba5; see the method README).

    The pipeline fields are :class:`~mmiad.methods.settings.MethodSettings`' (``dino-pointmae`` is the paper's
    DINO ViT-B/8 + Point-MAE; the weight-free default runs without downloads). ``profile`` defaults to ``none``:
    CIF reads raw clouds, and its MVTec 3D-AD foreground rule needs the background plane in them.

    Attributes:
        n_clusters: Hyperedges per image (K-means K); None: 8 on Eyecandies, 4 otherwise (official scripts).
        membership_threshold: A patch joins every hyperedge whose min-max-normalised cosine reaches this (0.9).
        kmeans_seed: K-means ``random_state`` (0 officially).
        foreground: ``auto``, ``corner_plane``, ``z_positive`` or ``valid`` (see :mod:`~mmiad.methods.cif.foreground`).
        plane_threshold: ``corner_plane``: distance to the corner surface that makes a pixel foreground (7e-3).
        gap_fills: ``corner_plane``: gap-filling passes before the surface is fitted (3).
        sampling_ratio: Memory size as a fraction of *all* patches of the shots (0.1).
        coreset_eps: Johnson–Lindenstrauss ε of the per-cluster coreset's projection (0.9).
        seed: Seed of that projection (the official one is unseeded).
        hops: Message-passing steps L (1, from ``eval.sh``; eval.py's own default is 2).
        alpha: Self-retention α of the propagation (0.9, from ``eval.sh``; eval.py's default is 0.4).
        top_hyperedges: Memory clusters searched per test hyperedge (3).
        n_neighbors: Memory neighbours of the image-score reweighting (9; 1 means the plain maximum).
        power: Exponent applied to the fused RGB × XYZ map before smoothing (1.5).
        smoothing: ``box_cascade`` (official: 5× box 5×5, 3× box 7×7), ``gaussian``, ``pil_uint8`` or ``none``.
        sigma: σ of the ``gaussian`` alternative.
    """

    profile: str = "none"
    n_clusters: int | None = None
    membership_threshold: float = 0.9
    kmeans_seed: int = 0
    foreground: str = "auto"
    plane_threshold: float = 7e-3
    gap_fills: int = 3
    sampling_ratio: float = 0.1
    coreset_eps: float = 0.9
    seed: int = 0
    hops: int = 1
    alpha: float = 0.9
    top_hyperedges: int = 3
    n_neighbors: int = 9
    power: float = 1.5
    smoothing: str = "box_cascade"
    sigma: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.foreground not in FOREGROUND_RULES:
            raise ValueError(f"unknown foreground {self.foreground!r}; expected one of {FOREGROUND_RULES}")
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"unknown smoothing {self.smoothing!r}; expected one of {SMOOTHINGS}")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError(f"n_clusters must be at least 1 (None: the per-dataset value), got {self.n_clusters}")
        if not 0 <= self.membership_threshold <= 1:
            raise ValueError(f"membership_threshold must be in [0, 1], got {self.membership_threshold}")
        if not 0 < self.sampling_ratio <= 1 or not 0 < self.coreset_eps < 1:
            raise ValueError("need 0 < sampling_ratio <= 1 and 0 < coreset_eps < 1")
        if self.hops < 1 or not 0 <= self.alpha <= 1:
            raise ValueError("need hops >= 1 and 0 <= alpha <= 1")
        if self.top_hyperedges < 1 or self.n_neighbors < 1 or self.gap_fills < 0:
            raise ValueError("need top_hyperedges >= 1, n_neighbors >= 1 and gap_fills >= 0")
        if not self.plane_threshold > 0 or not self.power > 0 or not self.sigma > 0:
            raise ValueError("need plane_threshold > 0, power > 0 and sigma > 0")
