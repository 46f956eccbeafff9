"""The one function that exports any torch module to ONNX, and the scorer-graph contract every method follows.

A method's scorer module lives in its own package (``methods/<m>/export.py``) and reproduces the library's own
inference path by calling the same functions, so an exported graph cannot drift from the PyTorch model it came
from. What changes is only the form: data-dependent indexing (running the MLPs on foreground rows only) becomes a
dense computation with a mask, which ONNX expresses without dynamic shapes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from mmiad.export._deps import require_onnx

#: ONNX opset of every exported graph: Gelu/Erf, Resize (half-pixel bilinear) and reflect Pad are all in 17,
#: which every onnxruntime since 1.14 runs.
OPSET = 17
EXPORTABLE_SMOOTHINGS = ("gaussian", "box_cascade", "none")


def check_exportable_smoothing(smoothing: str) -> None:
    """Refuse a smoothing that ONNX cannot reproduce (PIL's uint8 blur), naming the ones it can."""
    if smoothing not in EXPORTABLE_SMOOTHINGS:
        raise ValueError(
            f"smoothing {smoothing!r} cannot be exported (it quantises through PIL); "
            f"exportable: {', '.join(EXPORTABLE_SMOOTHINGS)}"
        )


@dataclass(frozen=True)
class GraphSpec:
    """Names and shapes of one graph's inputs and outputs (``-1`` or a string marks a dynamic axis)."""

    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The ``dynamic_axes`` argument of :func:`torch.onnx.export`."""
        axes: dict[str, dict[int, str]] = {}
        for name, shape in {**self.inputs, **self.outputs}.items():
            named = {i: d for i, d in enumerate(shape) if isinstance(d, str)}
            if named:
                axes[name] = named
        return axes

    def to_dict(self, dtypes: dict[str, str] | None = None) -> dict[str, Any]:
        """JSON-ready description for the manifest."""
        dtypes = dtypes or {}

        def describe(items: dict[str, list[int | str]]) -> list[dict[str, Any]]:
            return [{"name": k, "shape": v, "dtype": dtypes.get(k, "float32")} for k, v in items.items()]

        return {"inputs": describe(self.inputs), "outputs": describe(self.outputs)}


class ExtractCall(nn.Module):
    """Wraps an extractor whose ``extract`` is pure torch (the texture descriptor) so it can be traced."""

    def __init__(self, extractor: Any) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.extractor.extract(rgb)


def export_graph(module: nn.Module, example: tuple[torch.Tensor, ...], path: str | Path, spec: GraphSpec) -> Path:
    """Trace ``module`` on ``example`` into ``path`` (TorchScript exporter, opset :data:`OPSET`) and check it."""
    onnx = require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    # Mini-PointNet runs its groups in chunks of a fixed size; one chunk of unbounded size keeps the number of
    # groups a free (dynamic) axis of the graph instead of unrolling a shape-dependent loop.
    with (
        mock.patch("mmiad.features.pointmae._GROUP_CHUNK", 2**31 - 1),
        warnings.catch_warnings(),
        torch.no_grad(),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes(),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return path


SCORER_GRAPH = "scorer.onnx"


def export_scorer_graph(
    scorer: nn.Module, channels_2d: int, channels_3d: int, grid: int, size: int, out_dir: str | Path
) -> dict[str, Any]:
    """Export a scorer under the contract every method's scorer shares, so one ONNX runtime serves them all.

    Inputs ``grid_2d`` (C2,G,G), ``grid_3d`` (C3,G,G), ``foreground`` (G,G) bool; outputs ``anomaly_map`` (S,S),
    ``map_2d`` and ``map_3d`` (G,G) and the image ``score``.
    """
    generator = torch.Generator().manual_seed(0)
    example = (
        torch.randn(channels_2d, grid, grid, generator=generator),
        torch.randn(channels_3d, grid, grid, generator=generator),
        torch.ones(grid, grid, dtype=torch.bool),
    )
    spec = GraphSpec(
        inputs={
            "grid_2d": [channels_2d, grid, grid],
            "grid_3d": [channels_3d, grid, grid],
            "foreground": [grid, grid],
        },
        outputs={"anomaly_map": [size, size], "map_2d": [grid, grid], "map_3d": [grid, grid], "score": []},
    )
    export_graph(scorer, example, Path(out_dir) / SCORER_GRAPH, spec)
    return {"file": SCORER_GRAPH, **spec.to_dict({"foreground": "bool"})}
