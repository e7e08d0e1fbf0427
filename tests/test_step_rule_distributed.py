"""``step_rule="quadratic"`` under DDP (2 gloo ranks): identical ranks, equal to one process on
the concatenated batch (the exact curvature and rho's losses are averaged over ranks)."""

from __future__ import annotations

import pytest
import torch

from tests.core.test_distributed import spawn
from tests.ddp_scripts import step_rule_case as S


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    spawn(S.worker, (2, str(tmp_path / "store"), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = S.reference()
    for name, value in ref["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])
        assert torch.allclose(ranks[0]["params"][name], value, rtol=1e-9, atol=1e-12), name
    assert ranks[0]["alphas"] == pytest.approx(ref["alphas"], rel=1e-9)
    assert ranks[0]["damping"] == pytest.approx(ref["damping"], rel=1e-12)
    assert ranks[1]["damping"] == ranks[0]["damping"]
    assert ref["damping"] != S.OPTIONS["damping"]  # the LM rule acted
