"""Anomaly detection methods, one package each, sharing model files, smoothing and thresholds."""
