"""Standalone multi-process scripts and spawn targets for the distributed tests."""
