"""Frozen feature extractors (deep and weight-free), checkpoints and the feature cache.

Importing this package registers the built-in extractors (see :mod:`mmiad.features.registry`); a new extractor is
its own module plus one line here.
"""

from mmiad.features import fpfh, noimage, texture, vit_tokens, weights, wideresnet  # noqa: F401  (each registers its extractors)
