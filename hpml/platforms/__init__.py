"""The outside systems a study runs on (no torch): SLURM, and SageMaker."""
