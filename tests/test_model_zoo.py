"""The model zoo (benchmarks/zoo_models.py): real third-party definitions and hand-written CNNs.

For GPT-2, BERT, Llama (transformers, small configs, no download) and the ResNet- and
MobileNet-style CNNs:

- the coverage the engine reports (``pre.coverage()`` and the summary's last line) equals the
  trainable parameters held by the modules it preconditions, counted here independently (each
  tensor once) and the total equals the model's trainable parameters;
- a few SGD steps with K-FAC (default options) give finite losses, and a final loss (mean of the
  last 3 steps) no worse than 5% above the same run without K-FAC.

The table with step-time ratios and peak memory comes from ``python -m benchmarks.zoo``.
Coverage figures follow what the engine supports; they are not hard-coded.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from benchmarks.zoo import final_loss, train
from benchmarks.zoo_models import ZOO, build
from lightning_kfac import KFACPreconditioner

pytest.importorskip("transformers")

STEPS, BATCH = 6, 16  # batch 8 makes BatchNorm's few-step losses too noisy to compare


@pytest.fixture
def one_thread():
    """One torch thread (the CPUs here are shared: more threads make small steps far slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _preconditioned_params(model, names) -> int:
    modules = dict(model.named_modules())
    unique = {
        id(p): p
        for name in names
        for p in modules[name].parameters(recurse=False)
        if p.requires_grad
    }
    return sum(p.numel() for p in unique.values())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_coverage_is_the_preconditioned_modules_parameters(name):
    model, _, _ = build(name, batches=1, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = KFACPreconditioner(model)
    reported = pre.coverage()
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert reported["trainable"] == total
    assert reported["covered"] == _preconditioned_params(model, pre.layers) > 0
    assert math.isclose(reported["share"], reported["covered"] / total)
    line = pre.summary().splitlines()[-1]
    covered, trainable = re.search(r"([\d,]+) of ([\d,]+) trainable", line).groups()
    assert (int(covered.replace(",", "")), int(trainable.replace(",", ""))) == (
        reported["covered"],
        total,
    )
    pre.remove()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_few_steps_finite_and_not_worse_than_plain(name, one_thread):
    plain = train(name, kfac=False, steps=STEPS, batch_size=BATCH)
    kfac = train(name, kfac=True, steps=STEPS, batch_size=BATCH)
    assert plain["losses"][0] == kfac["losses"][0]  # same initialization and first batch
    assert all(math.isfinite(x) for x in kfac["losses"])
    assert final_loss(kfac) <= 1.05 * final_loss(plain), (kfac["losses"], plain["losses"])
