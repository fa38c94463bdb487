"""Tests of hpml.study."""
