"""Sweeper: runs hyperparameter sweeps (HyperDrive) as children scheduled like any run."""
