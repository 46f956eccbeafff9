"""Frozen feature extractors (deep and weight-free), checkpoints and the feature cache."""
