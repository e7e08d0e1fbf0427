"""Test helpers: dense brute-force references (``dense``), independent of ``lightning_kfac``."""
