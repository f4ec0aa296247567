"""PatchCore anomaly detection for industrial inspection images."""
