"""Tests of hpml.platforms: SLURM and SageMaker."""
