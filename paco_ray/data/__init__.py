"""Datasets, long-tailed splits and loaders."""
