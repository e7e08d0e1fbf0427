"""Shared test setup. The repository root is on sys.path through pytest's ``pythonpath``
setting (pyproject.toml), so ``tests.support``, ``examples`` and
``benchmarks`` import as packages."""
