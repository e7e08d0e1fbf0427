"""The dependency direction of the package: the engine never imports Lightning or Hydra.

``lightning_kfac.core``, the preconditioner and the diagnostics must import with
``pytorch_lightning``, ``lightning`` and ``hydra`` unavailable; the modules that adapt to
Lightning are the only ones that name it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING_ADAPTERS = {"callback.py", "adaptive_damping.py", "diagnostics_callback.py",
                      "lightning.py", "cli_errors.py"}  # lightning.py: the unified package's class

BLOCKER = r'''
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"pytorch_lightning", "lightning", "hydra", "omegaconf"}:
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
import lightning_kfac, lightning_kfac.core.kaisa, lightning_kfac.core.mc, lightning_kfac.core.ekfac
import lightning_kfac.core.damping, lightning_kfac.core.lowrank, lightning_kfac.diagnostics
import torch
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
pre = lightning_kfac.KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1)
model(torch.randn(5, 3)).pow(2).mean().backward()
pre.step()
print(sorted(pre.factors()))
'''


def test_engine_imports_and_runs_with_lightning_and_hydra_blocked():
    out = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['0', '2']"


def test_only_the_adapters_import_lightning():
    package = ROOT / "lightning_kfac"
    importers = {str(p.relative_to(package)) for p in package.rglob("*.py")
                 if re.search(r"^\s*(import|from) (pytorch_lightning|lightning)\b", p.read_text(),
                              re.M)}
    assert importers <= LIGHTNING_ADAPTERS, importers - LIGHTNING_ADAPTERS
    assert "callback.py" in importers
