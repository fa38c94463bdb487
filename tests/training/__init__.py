"""Tests of hpml.training."""
