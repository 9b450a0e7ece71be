"""Scores and probes of a finished run: caption metrics, image-dependence probes, baselines."""
