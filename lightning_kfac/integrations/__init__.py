"""Adapters from the K-FAC engine to frameworks: Lightning (``integrations.lightning``) and Hydra
(``integrations.hydra``).

The engine (``lightning_kfac.config``, ``lightning_kfac.core``, ``lightning_kfac.preconditioner``
and the other top-level modules) imports with torch alone; only the modules under this package
import ``pytorch_lightning``, ``lightning``, ``hydra`` or ``omegaconf`` (tests/test_import_rules.py
checks it). This package's ``__init__`` imports nothing, so importing one adapter does not pull in
the other framework.
"""
