"""Shared test setup. The repository root is on sys.path through pytest's ``pythonpath``
setting (pyproject.toml), so ``tests.helpers``, ``examples`` and ``benchmarks`` import as packages."""
