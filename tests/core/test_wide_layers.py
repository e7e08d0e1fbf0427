"""Wide layers: structures chosen by size and budget, the predicted peak against a measured one,
refusal of a model that cannot fit, and a 32000-vocabulary Llama trained with the defaults.

The peak is measured in a fresh process (tests/support/peak_memory.py: resident-set peaks around
forward/backward and around the rest of each step, with and without K-FAC, on the same batches)
and must be within 25% of ``footprint(...).peak``, the figure the fit-start summary prints.
Step times are in benchmarks/wide_layers.py (no timing assert here).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACConfig, KFACPreconditioner
from lightning_kfac.core.budget import MemoryBudgetError
from lightning_kfac.core.footprint import footprint
from tests.support.peak_memory import measure

MIB = 2**20


def _llama(vocab: int = 32000):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _structures(pre):
    return {name: (b.a_structure.name, b.g_structure.name) for name, b in pre.blocks.items()}


# -- structures chosen by size ------------------------------------------------------------------
@pytest.mark.slow  # importing transformers and building the model: ~10 s
def test_llama_32000_defaults_choose_diagonal_vocabulary_sides() -> None:
    model = _llama()
    pre = KFACPreconditioner(model)  # defaults: max_dense_dim=2048, memory_budget_gib=2
    chosen = _structures(pre)
    assert chosen.pop("lm_head") == ("dense", "diagonal")  # G: 32000 outputs
    assert chosen.pop("model.embed_tokens") == ("diagonal", "dense")  # A: token counts
    assert chosen and set(chosen.values()) == {("dense", "dense")}  # every projection / MLP
    peak = footprint(pre.blocks.values()).peak
    assert peak < 64 * MIB, peak  # dense 32000^2 G alone would be 3.8 GiB
    summary = pre.summary()
    assert "32000 diagonal (> max_dense_dim=2048)" in summary and "predicted peak" in summary
    pre.remove()


def test_linear_50000_head_gets_a_diagonal_g_and_a_finite_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 50000, bias=False)
    pre = KFACPreconditioner(
        model, kl_clip=None, damping=1e-3, damping_mode="absolute", factor_init="batch"
    )
    assert _structures(pre) == {"": ("dense", "diagonal")}
    x, y = torch.randn(32, 64), torch.randint(0, 50000, (32,))
    out = model(x)
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    g = out.grad * 32  # per-example output gradients of the mean loss
    raw = model.weight.grad.clone()
    pre.step()
    A, G = pre.factors()[""]  # diag(G) as a sparse 50000 x 50000 matrix (dense: 9.3 GiB)
    assert A.shape == (64, 64) and G.shape == (50000, 50000) and G.layout == torch.sparse_coo
    assert torch.equal(G.indices()[0], G.indices()[1])
    assert torch.allclose(G.values(), g.square().mean(0), rtol=1e-4, atol=1e-12)
    # eigen with diag(G): P = [grad Q_A / (e_G e_A^T + damping)] Q_A^T
    eA, QA = torch.linalg.eigh(A.double())
    P = ((raw.double() @ QA) / (G.values().double()[:, None] * eA[None] + 1e-3)) @ QA.T
    err = torch.linalg.norm(model.weight.grad.double() - P) / torch.linalg.norm(P)
    assert err < 1e-4, err  # float32 engine against a float64 product


# -- the budget -----------------------------------------------------------------------------------
def test_budget_makes_the_widest_dense_sides_diagonal_and_warns() -> None:
    model = nn.Sequential(nn.Linear(1500, 900), nn.Tanh(), nn.Linear(900, 10))
    full = footprint(KFACPreconditioner(model, memory_budget_gib=None).blocks.values()).peak
    budget = full * 0.6 / 2**30
    with pytest.warns(RuntimeWarning, match="memory_budget_gib"):
        pre = KFACPreconditioner(model, memory_budget_gib=budget)
    assert _structures(pre) == {"0": ("diagonal", "dense"), "2": ("dense", "dense")}
    assert pre.blocks["0"].structure_reason["A"] == "memory budget"
    assert footprint(pre.blocks.values()).peak <= budget * 2**30
    assert "1501 diagonal (memory budget)" in pre.summary()


def test_a_model_that_cannot_fit_is_refused_naming_layers_and_option() -> None:
    model = nn.Sequential(nn.Linear(64, 3000), nn.Tanh(), nn.Linear(3000, 10))
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(MemoryBudgetError, match=r"memory_budget_gib=0\.0001.*'0'.*skip_layers"):
        KFACPreconditioner(model, memory_budget_gib=1e-4)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before


def test_callback_refuses_at_fit_start(tmp_path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from lightning_kfac import KFACCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(64, 3000)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 64), torch.randint(0, 3000, (8,))),
        batch_size=4,
    )
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[KFACCallback(memory_budget_gib=1e-4)],
    )
    with pytest.raises(MisconfigurationException, match="memory_budget_gib"):
        trainer.fit(Module(), data)


def test_config_defaults_are_the_measured_ones() -> None:
    cfg = KFACConfig()
    assert cfg.max_dense_dim == 2048 and cfg.memory_budget_gib == 2.0


# -- predicted peak against the measured one -------------------------------------------------------
def _check_peak(spec) -> dict:
    result = measure(spec)
    extra, predicted = result["extra"], result["predicted"]
    assert abs(predicted - extra) <= 0.25 * extra, (predicted / MIB, extra / MIB, result)
    return result


@pytest.mark.slow  # three 1200 x 1200 eighs in a fresh process
def test_predicted_peak_within_25_percent_dense_head() -> None:
    """A 1200-wide dense G (eigen): factors, eigh workspace and products dominate."""
    _check_peak(
        dict(
            model="head",
            d_in=64,
            d_out=1200,
            batch=16,
            steps=3,
            bias=True,
            options=dict(factor_update_steps=1, inv_update_steps=1),
        )
    )


def test_predicted_peak_within_25_percent_wide_diagonal_head() -> None:
    """Linear(64, 50000) with the defaults: G diagonal; the product temporaries dominate."""
    result = _check_peak(dict(model="head", d_in=64, d_out=50000, batch=64, steps=3, options={}))
    assert result["structures"] == {"": ["dense", "diagonal"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["inverse", "ekfac"])
def test_predicted_peak_within_25_percent_other_methods(method) -> None:
    _check_peak(
        dict(
            model="head",
            d_in=64,
            d_out=2000,
            batch=16,
            steps=3,
            bias=True,
            options=dict(compute_method=method, factor_update_steps=1, inv_update_steps=1),
        )
    )


@pytest.mark.slow
def test_llama_32000_defaults_peak_predicted_and_within_2_gib_of_plain() -> None:
    pytest.importorskip("transformers")
    result = _check_peak(dict(model="llama", vocab=32000, batch=4, seq=64, steps=3, options={}))
    assert result["kfac"] - result["plain"] <= 2 * 2**30


@pytest.mark.slow
def test_llama_32000_trains_with_callback_defaults(tmp_path) -> None:
    """A real Trainer, KFACCallback() with every default, a few steps: lm_head preconditioned."""
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_kfac import KFACCallback

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _llama()

        def training_step(self, batch, _):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randint(0, 32000, (12, 32))), batch_size=4
    )
    callback = KFACCallback()
    module = LM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(
            max_steps=3,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[callback],
        ).fit(module, data)
    factors = callback.factors()
    assert "model.lm_head" in factors and "model.model.embed_tokens" in factors
    A, G = factors["model.lm_head"]
    assert A.shape == (64, 64) and G.shape == (32000, 32000)
    assert callback.preconditioner.counters["decompositions"] > 0
