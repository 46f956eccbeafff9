"""The LSPN trainer on a synthetic fusion set: statistics, checkpoint choice (official and alternative), learning."""

from __future__ import annotations

import torch

from mmiad.methods.g2sf.banks import PatchRows, UnimodalBanks
from mmiad.methods.g2sf.config import G2SFConfig
from mmiad.methods.g2sf.lspn import pair_score
from mmiad.methods.g2sf.training import FusionSet, LSPNTrainer
from mmiad.methods.memorybank import MemoryBank


def _setup(seed: int = 0) -> tuple[UnimodalBanks, FusionSet]:
    gen = torch.Generator().manual_seed(seed)
    banks = UnimodalBanks(MemoryBank(fraction=1.0), MemoryBank(fraction=1.0), 4, 8)
    for _ in range(2):
        banks.add(PatchRows(rgb=torch.randn(16, 4, generator=gen), point=torch.randn(64, 3, generator=gen)))
    banks.finalize()
    n = 600
    rgb = torch.randn(n, 4, generator=gen)
    point = torch.randn(n, 3, generator=gen)
    labels = torch.ones(n, dtype=torch.long)
    labels[:150] = -1
    point[:150] += 3.0  # anomalies are far in the point modality only
    features = torch.cat([rgb, point], dim=1)
    rgb_d, rgb_i = banks.rgb.search.search(rgb, 20)
    point_d, point_i = banks.point.search.search(point, 20)
    data = FusionSet(features, torch.stack([rgb_d[:, 0], point_d[:, 0]], 1), torch.cat([rgb_i, point_i], 1), labels)
    return banks, data


def _config(**overrides: object) -> G2SFConfig:
    settings: dict = {"hidden": 16, "emb_dim": 8, "epochs": 3, "device": "cpu", **overrides}
    return G2SFConfig(**settings)


def test_mu_is_the_mean_nominal_distance_and_the_trained_score_separates() -> None:
    banks, data = _setup()
    trained = LSPNTrainer(_config(epochs=4), banks, torch.device("cpu")).train(data)
    nominal = data.distances[data.labels == 1].mean(dim=0)
    torch.testing.assert_close(trained.mu, nominal, rtol=0.15, atol=0.0)  # batch means of resampled halves
    sigma = trained.scale().detach()
    assert abs(float(sigma.sum()) - 1.0) < 1e-6
    protos = banks.coreset_rows(data.indices, 0, 20)
    score, _, _ = pair_score(trained.network, sigma, data.features, protos, 4, trained.mu)
    normal, anomalous = score[data.labels == 1], score[data.labels == -1]
    auroc = float((anomalous[:, None] > normal[None, :]).double().mean())
    assert auroc > 0.95
    assert trained.margin > 0 and len(trained.history) == 4
    assert all(set(h) >= {"svdd", "margin", "scaling", "perm", "const", "l1", "val"} for h in trained.history)


def test_first_epoch_is_never_checkpointed_unless_asked() -> None:
    banks, data = _setup()
    official = LSPNTrainer(_config(), banks, torch.device("cpu")).train(data)
    vals = [h["val"] for h in official.history]
    assert official.best_epoch >= 1 and vals[official.best_epoch] == min(vals[1:])
    allowed = LSPNTrainer(_config(checkpoint_first_epoch=True), banks, torch.device("cpu")).train(data)
    vals = [h["val"] for h in allowed.history]
    assert vals[allowed.best_epoch] == min(vals)
    one = LSPNTrainer(_config(epochs=1), banks, torch.device("cpu")).train(data)
    assert one.best_epoch == -1  # nothing checkpointed: the last state is kept


def test_consistency_forms_train_differently() -> None:
    banks, data = _setup()
    first = LSPNTrainer(_config(), banks, torch.device("cpu")).train(data)
    second = LSPNTrainer(_config(consistency="per_sample"), banks, torch.device("cpu")).train(data)
    assert first.history[0]["const"] != second.history[0]["const"]
