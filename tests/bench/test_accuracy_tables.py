from __future__ import annotations

from mmiad.bench.accuracy import ablation_table


def _row(i_auroc: float, train_s: float) -> dict:
    mean = {"image_auroc": i_auroc, "pixel_auroc": 0.99, "aupro@0.3": 0.95, "aupro@0.01": None}
    return {"result": {"mean": mean, "per_category": {}}, "train_s": train_s, "test_s": 4.0}


def test_ablation_table_marks_the_parts_each_variant_uses_in_paper_order() -> None:
    rows = {"Uni-RCM": _row(0.9, 300), "Uni-RCM RFI": _row(0.8, 100), "Uni-RCM baseline mapping": _row(0.7, 10)}
    lines = ablation_table(rows, samples=96).splitlines()
    assert lines[0].startswith("| variant | ORQ | RFI | RAM | I-AUROC")
    assert lines[2:] == [
        "| Uni-RCM baseline mapping |  |  |  | 0.700 | 0.990 | 0.950 | — | 10 | 24.0 |",
        "| Uni-RCM RFI |  | ✓ |  | 0.800 | 0.990 | 0.950 | — | 100 | 24.0 |",
        "| Uni-RCM | ✓ | ✓ | ✓ | 0.900 | 0.990 | 0.950 | — | 300 | 24.0 |",
    ]
