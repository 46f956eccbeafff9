"""Data layer: typed samples, dataset formats, preprocessing and the synthetic generator.

Importing this package registers the built-in dataset formats (see :mod:`mmiad.data.formats`); a new layout is its
own module plus one line here.
"""

from mmiad.data import eyecandies, folder, mvtec3d  # noqa: F401  (each registers its format)
