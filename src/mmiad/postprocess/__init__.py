"""Turning raw per-pixel discrepancies into final maps, scores, thresholds and masks (shared by every method)."""
