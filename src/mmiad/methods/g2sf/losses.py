"""G2SF's training losses, each as the official ``Fusion/loss.py`` and ``fusion_engine_v2.py`` compute it.

Labels follow the official loaders: y = +1 for a nominal patch, y = −1 for a pseudo-anomalous one. δ = l₀² is
the squared unified score of a patch and its nearest prototype pair (the official SVDD centre is 0).

* L_sep (``svdd``): nominal δ·clamp(δ^α, 0.33, 3); anomalous relu(1/(δ+ε) − 1/M)·clamp((1/(δ+ε))^α, 0.33, 3);
  the mean over the batch. The weights are not detached, as in the code.
* L_mar (``margin``): distances scaled by the ``perc`` quantile of the nominal ones; nominal ones above the
  smallest anomalous one and anomalous ones below the nominal quantile are penalised; divided by B.
* L_sc (``scaling``): anomalous scales pushed to e, nominal ones to at most 1.
* L_cma (``perm``): scales of mismatched direction/prototype pairs pushed to e.
* L_cns (``const``): a farther prototype may not score above β·(its distance ratio)·l₀, and prototypes of
  ranks A+1..2A may not score below l₀.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-5
CLAMP = (0.33, 3.0)


def separation_loss(
    delta: torch.Tensor, labels: torch.Tensor, margin: float, *, alpha: float = 2.0, weighted: bool = True
) -> torch.Tensor:
    """L_sep of squared unified scores ``delta`` (B,), labels ±1 and SVDD margin M (= 2·max anomalous s/μ)."""
    normal, anomaly = delta[labels == 1], delta[labels == -1]
    loss_normal = normal
    loss_anomaly = F.relu(1.0 / (anomaly + EPS) - 1.0 / margin)
    if weighted:
        loss_normal = normal * torch.clamp(normal**alpha, *CLAMP)
        loss_anomaly = loss_anomaly * torch.clamp((1.0 / (anomaly + EPS)) ** alpha, *CLAMP)
    return torch.cat([loss_normal, loss_anomaly]).mean()


def margin_loss(delta: torch.Tensor, labels: torch.Tensor, perc: float = 1.0) -> torch.Tensor:
    """L_mar: overlap of the (perc-quantile-scaled) nominal and anomalous distance ranges, divided by B."""
    scale = torch.quantile(delta[labels == 1], perc)
    normal = delta[labels == 1] / scale
    anomaly = delta[labels == -1] / scale
    lower = anomaly.min()
    upper = torch.quantile(normal, perc)
    return (F.relu(normal - lower).sum() + F.relu(upper - anomaly).sum()) / delta.shape[0]


def scaling_loss(weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_sc: mean (e − w) over anomalous rows and both modalities + mean relu(w − 1) over nominal ones."""
    return (math.e - weights[labels == -1]).mean() + F.relu(weights[labels == 1] - 1.0).mean()


def permutation_loss(permuted_weights: torch.Tensor) -> torch.Tensor:
    """L_cma: mean (e − w) over every row and modality of the LSPN output on mismatched pairs."""
    return (math.e - permuted_weights).mean()


def permute_pairs(
    features: torch.Tensor, prototypes: torch.Tensor, split: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mismatched pairs: in the first ⌊B/2⌋ rows the RGB and point parts of the *features* are shuffled
    independently among those rows; in the rest, the two parts of the *prototypes* are."""
    half = features.shape[0] // 2

    def shuffled(rows: torch.Tensor) -> torch.Tensor:
        order = torch.randperm(rows.shape[0], generator=generator).to(rows.device)
        return rows[order]

    feats = torch.cat(
        [
            torch.cat([shuffled(features[:half, :split]), shuffled(features[:half, split:])], dim=1),
            features[half:],
        ]
    )
    protos = torch.cat(
        [
            prototypes[:half],
            torch.cat([shuffled(prototypes[half:, :split]), shuffled(prototypes[half:, split:])], dim=1),
        ]
    )
    return feats, protos


def consistency_loss(
    score0: torch.Tensor,
    mean0: torch.Tensor,
    near: list[tuple[torch.Tensor, torch.Tensor]],
    far: list[torch.Tensor],
    *,
    magnitude: float = 1.2,
    form: str = "broadcast",
) -> torch.Tensor:
    """L_cns over A near ranks (score l_j, mean normalised distance s̄_j) and A far ranks (score l_j).

    ``broadcast`` is what the code computes: l (B,1) against ratios (B,), so the near term averages the B×B
    matrix [i, k] = l_j[i] − β·(s̄_j[k]/s̄_0[k])·l_0[i]; ``per_sample`` is its diagonal, the intended form.
    """
    if form not in ("broadcast", "per_sample"):
        raise ValueError(f"unknown consistency form {form!r}")
    anchor = len(near)
    total = torch.zeros((), dtype=score0.dtype, device=score0.device)
    for score_j, mean_j in near:
        ratio = mean_j / mean0
        if form == "broadcast":
            gap = score_j[:, None] - magnitude * ratio[None, :] * score0[:, None]
        else:
            gap = score_j - magnitude * ratio * score0
        total = total + F.relu(gap).mean() / anchor
    for score_j in far:
        total = total + F.relu(score0 - score_j).mean() / anchor
    return total
