"""Anomaly detection methods, one package each, registered by name (see :mod:`mmiad.methods.registry`).

Importing this package registers the built-in methods; a new method is its own package plus one line here.
"""

from mmiad.methods import btf, cfm, cif, cmdr, g2sf, glfm, m3dm, musc, rad, unircm  # noqa: F401  (each registers itself)
