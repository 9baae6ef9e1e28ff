"""YAML presets (cpu-small, gpu-default, gpu-large, cluster-slurm), shipped as package data."""
