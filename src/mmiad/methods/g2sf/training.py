"""Training the LSPN and the global scale on the pseudo-anomalous patches (official ``MMScoringTrainer``).

The fusion set (one row per foreground patch of every pseudo sample: feature, raw NN distances, top-k coreset
indices, label ±1) is split 50/50 at patch level; both halves are read through a class-balanced sampler with
replacement and ``drop_last``. Before training, μ (mean nominal NN distance per modality, averaged over the
training batches) and the SVDD margin M = 2·max(s/μ) over anomalous patches are fixed. Every epoch trains with
input noise and the six weighted losses (two Adam optimisers: network and θ), then validates (rank-0 prototypes,
no noise); the state with the lowest L_sep + w_mar·L_mar on validation is kept.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mmiad.methods.g2sf.banks import UnimodalBanks
from mmiad.methods.g2sf.config import G2SFConfig
from mmiad.methods.g2sf.losses import (
    consistency_loss,
    margin_loss,
    permutation_loss,
    permute_pairs,
    scaling_loss,
    separation_loss,
)
from mmiad.methods.g2sf.lspn import LSPN, GlobalScale, direction, modality_distances, pair_score, unified_score
from mmiad.utils.compute import autocast
from mmiad.utils.threads import single_thread_on_cpu

#: Below this batch size the CPU training loop runs on one thread.
SMALL_BATCH = 512
LOSS_NAMES = ("svdd", "margin", "scaling", "perm", "const", "l1")


@dataclass
class FusionSet:
    """The pseudo-anomalous patch examples (official ``patch_lib.npz``, ``score.npy``, ``idx2coreset.npy``,
    ``per_label.npy``), with labels as the loaders give them: +1 nominal, −1 anomalous."""

    features: torch.Tensor
    distances: torch.Tensor
    indices: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Trained:
    """What training produces: the chosen LSPN and θ, the statistics and a per-epoch history."""

    network: LSPN
    scale: GlobalScale
    mu: torch.Tensor
    margin: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def batch_size(n_rows: int, cap: int) -> int:
    """The official ``min(cap, ⌊0.7·N⌋ // 20)``, at least 2 (a tiny set still trains)."""
    return max(2, min(cap, int(0.7 * n_rows) // 20))


def balanced_batches(
    labels: torch.Tensor, rows: torch.Tensor, size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """``WeightedRandomSampler`` (weight 1/class count, with replacement, len(rows) draws) + ``drop_last``."""
    subset = labels[rows]
    counts = {int(v): int((subset == v).sum()) for v in (-1, 1)}
    weights = torch.tensor([1.0 / counts[int(v)] for v in subset.tolist()], dtype=torch.double)
    drawn = rows[torch.multinomial(weights, len(rows), replacement=True, generator=generator)]
    for start in range(0, len(drawn) - size + 1, size):
        yield drawn[start : start + size]


def add_noise(rows: torch.Tensor, split: int, radius: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per modality, + r·u with u a uniform [0,1)^D vector L2-normalised and r ~ U(0, radius_m) per row."""
    parts = []
    for part, bound in ((rows[:, :split], radius[0]), (rows[:, split:], radius[1])):
        noise = torch.rand(part.shape, generator=generator).to(part.device)
        noise = noise / torch.linalg.vector_norm(noise, dim=1, keepdim=True).clamp_min(1e-12)
        scale = torch.rand(part.shape[0], 1, generator=generator).to(part.device) * bound
        parts.append(part + noise * scale)
    return torch.cat(parts, dim=1)


def _usable(labels: torch.Tensor) -> bool:
    return bool((labels == 1).any()) and bool((labels == -1).any())


class LSPNTrainer:
    """Trains one category's LSPN + θ on a fusion set against its banks (see the module docstring)."""

    def __init__(self, config: G2SFConfig, banks: UnimodalBanks, device: torch.device) -> None:
        self.config, self.banks, self.device = config, banks, device
        self.split = banks.split
        self.k = config.top_k

    def prototypes(self, indices: torch.Tensor, rank: int) -> torch.Tensor:
        """The rank-paired prototype rows of a batch, on the device."""
        return self.banks.coreset_rows(indices, rank, self.k).to(self.device)

    def statistics(
        self, data: FusionSet, rows: torch.Tensor, size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, float]:
        """μ (mean over batches of the batch's mean nominal raw distances) and m (max anomalous s/μ), each from
        its own pass of the sampler, as the official code iterates its loader twice."""
        means = []
        for batch in balanced_batches(data.labels, rows, size, generator):
            normal = data.distances[batch][data.labels[batch] == 1]
            if len(normal):
                means.append(normal.mean(dim=0))
        mu = torch.stack(means).mean(dim=0)
        peaks = []
        for batch in balanced_batches(data.labels, rows, size, generator):
            anomalous = data.distances[batch][data.labels[batch] == -1] / mu
            if len(anomalous):
                peaks.append(float(anomalous.max()))
        return mu, max(peaks)

    def losses(
        self,
        network: LSPN,
        sigma: torch.Tensor,
        data: FusionSet,
        batch: torch.Tensor,
        mu: torch.Tensor,
        margin: float,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """The six loss terms of one training batch (``calculate_loss``)."""
        config = self.config
        features = data.features[batch].to(self.device)
        labels = data.labels[batch].to(self.device)
        radius = config.noise * mu
        noisy = add_noise(features, self.split, radius, generator)
        noisy0 = add_noise(self.prototypes(data.indices[batch], 0), self.split, radius, generator)
        perm_f, perm_p = permute_pairs(noisy, noisy0, self.split, generator)
        # Every pair of the step in one forward: (f̃, m̃₀), the 2A clean ranks (f̃, m_j), then the mismatched pairs.
        ranks = 2 * config.anchor
        protos = [noisy0] + [self.prototypes(data.indices[batch], rank) for rank in range(1, ranks + 1)]
        feats = torch.cat([noisy] * (ranks + 1) + [perm_f])
        protos_all = torch.cat([*protos, perm_p])
        size = features.shape[0]
        weights_all = network(direction(feats, protos_all), protos_all).to(noisy.dtype)
        dists = modality_distances(feats[:-size], protos_all[:-size], self.split, mu)
        scores = unified_score(sigma, weights_all[:-size], dists).view(ranks + 1, size)
        dists = dists.view(ranks + 1, size, 2)
        score0, weights0 = scores[0], weights_all[:size]
        delta = score0**2
        terms = {
            "svdd": separation_loss(delta, labels, margin, alpha=config.alpha),
            "margin": margin_loss(delta, labels, config.perc),
            "scaling": scaling_loss(weights0, labels),
            "perm": permutation_loss(weights_all[-size:]),
        }
        near = [(scores[j], dists[j].mean(dim=1)) for j in range(1, config.anchor + 1)]
        far = [scores[j] for j in range(config.anchor + 1, ranks + 1)]
        terms["const"] = consistency_loss(
            score0, dists[0].mean(dim=1), near, far, magnitude=config.magnitude, form=config.consistency
        )
        terms["l1"] = network.l1()
        return terms

    @torch.no_grad()
    def validate(
        self,
        network: LSPN,
        sigma: torch.Tensor,
        data: FusionSet,
        rows: torch.Tensor,
        size: int,
        mu: torch.Tensor,
        margin: float,
        generator: torch.Generator,
    ) -> float:
        """Mean unweighted L_sep + w_mar · mean L_mar over the validation batches (rank 0, no noise)."""
        seps, mars = [], []
        for batch in balanced_batches(data.labels, rows, size, generator):
            labels = data.labels[batch].to(self.device)
            if not _usable(labels):
                continue
            features = data.features[batch].to(self.device)
            score0, _, _ = pair_score(network, sigma, features, self.prototypes(data.indices[batch], 0), self.split, mu)
            delta = score0.float() ** 2
            seps.append(float(separation_loss(delta, labels, margin, alpha=self.config.alpha, weighted=False)))
            mars.append(float(margin_loss(delta, labels, self.config.perc)))
        if not seps:
            return float("inf")
        return sum(seps) / len(seps) + self.config.loss_weights[1] * sum(mars) / len(mars)

    def train(self, data: FusionSet, progress: bool = False) -> Trained:
        """Split, statistics, epochs with validation-loss checkpointing; returns the chosen state."""
        config = self.config
        if not _usable(data.labels):
            raise ValueError("the fusion set needs both nominal and pseudo-anomalous patches")
        generator = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(len(data), generator=generator)
        n_train = max(1, int(config.train_fraction * len(data)))
        train_rows, val_rows = order[:n_train], order[n_train:]
        if not _usable(data.labels[train_rows]) or not _usable(data.labels[val_rows]):
            raise ValueError("too few pseudo-anomalous patches: a split half lacks one of the classes")
        size = min(batch_size(len(data), config.batch_size), len(train_rows), len(val_rows))
        mu, peak = self.statistics(data, train_rows, size, generator)
        margin = 2.0 * peak
        mu = mu.to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            network = LSPN(data.features.shape[1], config.hidden, config.emb_dim, config.dropout).to(self.device)
        scale = GlobalScale().to(self.device)
        net_opt = torch.optim.Adam(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        scale_opt = torch.optim.Adam(
            scale.parameters(), lr=config.scale_learning_rate, weight_decay=config.weight_decay
        )
        weights = dict(zip(LOSS_NAMES, config.loss_weights, strict=True))
        best = (float("inf"), -1, copy.deepcopy(network.state_dict()), scale.theta.detach().clone())
        history: list[dict[str, float]] = []
        # Small batches on a CPU run far faster on one thread (thread hand-offs cost more than the matmuls).
        threads = single_thread_on_cpu(self.device) if size < SMALL_BATCH else contextlib.nullcontext()
        with threads, torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(config.seed)  # dropout
            for epoch in tqdm(range(config.epochs), desc="train lspn", disable=not progress, leave=False):
                network.train()
                sums = dict.fromkeys(LOSS_NAMES, 0.0)
                steps = 0
                for batch in balanced_batches(data.labels, train_rows, size, generator):
                    if not _usable(data.labels[batch]):
                        continue
                    with autocast(self.device, config.precision):
                        terms = self.losses(network, scale(), data, batch, mu, margin, generator)
                    total = sum(weights[name] * term.float() for name, term in terms.items())
                    net_opt.zero_grad()
                    scale_opt.zero_grad()
                    total.backward()  # type: ignore[union-attr]
                    net_opt.step()
                    scale_opt.step()
                    steps += 1
                    for name, term in terms.items():
                        sums[name] += float(term.detach())
                network.eval()
                val = self.validate(network, scale(), data, val_rows, size, mu, margin, generator)
                history.append({**{k: v / max(steps, 1) for k, v in sums.items()}, "val": val})
                if (epoch > 0 or config.checkpoint_first_epoch) and val <= best[0]:
                    best = (val, epoch, copy.deepcopy(network.state_dict()), scale.theta.detach().clone())
        if best[1] >= 0:  # otherwise (one epoch, first not checkpointed) the last state stays
            network.load_state_dict(best[2])
            with torch.no_grad():
                scale.theta.copy_(best[3])
        network.eval().requires_grad_(False)
        scale.requires_grad_(False)
        return Trained(network, scale, mu.cpu(), margin, best[1], history)
