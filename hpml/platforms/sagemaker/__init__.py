"""SageMaker from the client (no torch): jobs through the SDK and boto3, their plan, prices, quotas and
estimates. The job's own side, its container's environment, is in hpml.config."""
