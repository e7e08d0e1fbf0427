"""Importable test support (``tests.support.x``), not tests: dense brute-force references
(``dense``, independent of ``lightning_kfac``), nested comparisons (``compare``), peak-memory
measurement in a fresh process (``peak_memory``) and the Lightning models, data, trainer factory
and hand-written reference loop of the callback tests (``lightning``)."""
