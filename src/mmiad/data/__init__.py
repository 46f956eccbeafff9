"""Data layer: typed samples, dataset readers, preprocessing and the synthetic generator."""
