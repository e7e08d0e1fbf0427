"""The unified ``lightning`` package: the same KFACCallback works with ``lightning.pytorch``.

Lightning calls callback hooks by name, so one callback class serves both ``pytorch_lightning``
and ``lightning.pytorch`` Trainers (no duplicated adapter). Unsupported strategies are matched by
class name, so ``lightning.pytorch``'s FSDP/DeepSpeed classes are refused too.
"""

from __future__ import annotations

import pytest
import torch

L = pytest.importorskip("lightning.pytorch", reason="the unified `lightning` package (a dev extra)")
import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.utilities.exceptions import MisconfigurationException  # noqa: E402

from lightning_kfac import KFACCallback  # noqa: E402
from lightning_kfac.integrations.lightning.callback import check_strategy  # noqa: E402

OPTIONS = dict(damping=1e-2, factor_update_steps=2, inv_update_steps=4, kl_clip=1e-2)


def _fit(package, boring_model_cls):
    torch.manual_seed(0)
    model = boring_model_cls()
    callback = KFACCallback(**OPTIONS)
    trainer = package.Trainer(
        max_steps=10,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model)
    return [p.detach().clone() for p in model.parameters()], callback.factors()


def test_lightning_pytorch_trainer_equals_pytorch_lightning_trainer():
    from lightning.pytorch.demos.boring_classes import BoringModel
    from pytorch_lightning.demos.boring_classes import BoringModel as PLBoringModel

    params_l, factors_l = _fit(L, BoringModel)
    params_pl, factors_pl = _fit(pl, PLBoringModel)
    assert sorted(factors_l) == sorted(factors_pl) == ["layer"]
    assert all(torch.equal(a, b) for a, b in zip(params_l, params_pl))
    assert all(torch.equal(a, b) for a, b in zip(factors_l["layer"], factors_pl["layer"]))
    torch.manual_seed(0)
    assert not torch.equal(params_l[0], BoringModel().layer.weight)  # training moved the weights


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_lightning_pytorch_sharded_strategies_are_refused(name):
    strategies = pytest.importorskip("lightning.pytorch.strategies")
    cls = getattr(strategies, name)
    strategy = cls.__new__(cls)  # no __init__: DeepSpeed is not installed, FSDP wants CUDA
    with pytest.raises(MisconfigurationException, match=name.replace("Strategy", "")):
        check_strategy(strategy)
