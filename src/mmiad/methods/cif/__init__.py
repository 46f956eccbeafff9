"""CIF: few-shot multimodal anomaly detection with semantic hypergraphs (``--method cif``); see README.md."""

from mmiad.methods.cif import model  # noqa: F401  (registers the method)
