"""The dependency direction of the package: the engine never imports Lightning or Hydra.

``lightning_kfac.config``, ``lightning_kfac.core``, the preconditioner and every other module
outside ``lightning_kfac/integrations/`` must import with ``pytorch_lightning``, ``lightning``,
``hydra`` and ``omegaconf`` unavailable, and none of them imports ``lightning_kfac.integrations``
(the adapters depend on the engine, never the reverse). The old module paths
``lightning_kfac.callback`` / ``.hydra`` / ``.lightning`` are re-export shims of the adapters.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_kfac"
FRAMEWORKS = ("pytorch_lightning", "lightning", "hydra", "omegaconf")
# Module paths users may have imported before the adapters moved: one-line re-exports.
SHIMS = {"callback.py", "hydra.py", "lightning.py"}

BLOCKER = r"""
import importlib.abc, pkgutil, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"pytorch_lightning", "lightning", "hydra", "omegaconf"}:
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
import lightning_kfac, lightning_kfac.core
SHIMS = {"lightning_kfac.callback", "lightning_kfac.hydra", "lightning_kfac.lightning"}
engine = sorted(m.name for m in pkgutil.walk_packages(lightning_kfac.__path__, "lightning_kfac.")
                if not m.name.startswith("lightning_kfac.integrations.") and m.name not in SHIMS)
for name in engine:
    __import__(name)
import torch
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
pre = lightning_kfac.KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1)
model(torch.randn(5, 3)).pow(2).mean().backward()
pre.step()
print(len(engine), sorted(pre.factors()))
"""


def _modules_outside_integrations() -> list:
    return [
        p
        for p in PACKAGE.rglob("*.py")
        if "integrations" not in p.relative_to(PACKAGE).parts
        and str(p.relative_to(PACKAGE)) not in SHIMS
    ]


def test_engine_imports_and_runs_with_lightning_and_hydra_blocked():
    """Every module outside integrations/ (and the shims) imports, and the engine runs, with the
    frameworks unimportable."""
    out = subprocess.run(
        [sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    count, factors = out.stdout.strip().split(" ", 1)
    assert int(count) == len(_modules_outside_integrations()), out.stdout
    assert factors == "['0', '2']"


def test_no_module_outside_integrations_names_a_framework_or_an_adapter():
    """Only the package's lazy ``__getattr__`` (``lightning_kfac.KFACCallback``) may reach into
    integrations/, and only when that name is first accessed."""
    framework = re.compile(rf"^\s*(import|from) ({'|'.join(FRAMEWORKS)})\b", re.MULTILINE)
    adapter = re.compile(r"^\s*(import|from) lightning_kfac\.integrations\b", re.MULTILINE)
    offenders = sorted(
        str(p.relative_to(PACKAGE))
        for p in _modules_outside_integrations()
        if framework.search(p.read_text())
        or (p != PACKAGE / "__init__.py" and adapter.search(p.read_text()))
    )
    assert offenders == [], offenders
    init = (PACKAGE / "__init__.py").read_text()
    assert not re.search(r"^(import|from) lightning_kfac\.integrations\b", init, re.MULTILINE)


def test_the_lightning_adapter_is_where_lightning_is_imported():
    lightning = re.compile(r"^\s*(import|from) (pytorch_lightning|lightning)\b", re.MULTILINE)
    importers = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if lightning.search(p.read_text())
    }
    assert "integrations/lightning/callback.py" in importers
    assert all(name.startswith("integrations/lightning/") for name in importers), importers


def test_old_module_paths_reexport_the_same_objects():
    import lightning_kfac
    from lightning_kfac import callback, hydra
    from lightning_kfac.integrations import hydra as integrations_hydra
    from lightning_kfac.integrations.lightning import callback as integrations_callback

    assert (
        callback.KFACCallback is integrations_callback.KFACCallback is lightning_kfac.KFACCallback
    )
    assert callback.check_strategy is integrations_callback.check_strategy
    assert hydra.KFACSchema is integrations_hydra.KFACSchema
    assert hydra.register_configs is integrations_hydra.register_configs
    assert "lightning_kfac.KFACCallback" == hydra.CALLBACK_TARGET
    if importlib.util.find_spec("lightning") is not None:  # the unified package (dev extra)
        from lightning_kfac import lightning as old_unified
        from lightning_kfac.integrations.lightning import unified

        assert old_unified.KFACCallback is unified.KFACCallback
    shims = {
        p.name
        for p in PACKAGE.glob("*.py")
        if "Compatibility re-export" in p.read_text().split('"""')[1]
    }
    assert shims == SHIMS
