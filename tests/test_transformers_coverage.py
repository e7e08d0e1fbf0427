"""Third-party language models (transformers, small configs, nothing downloaded): K-FAC covers
>= 90% of their trainable parameters, tied input embedding / output head included, and trains
them under the Lightning callback.

GPT-2's projections are ``transformers.pytorch_utils.Conv1D`` (weight in x out); its ``lm_head``
holds ``wte``'s Parameter; BERT's word embedding has ``padding_idx=0`` and, in the masked-LM
model, is tied to the decoder (whose own bias, also held by its parent head, stays raw).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_kfac import KFACPreconditioner

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) not installed")

VOCAB, WIDTH = 1000, 64


def gpt2(vocab=VOCAB, width=WIDTH):
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=width,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def bert_config(vocab=VOCAB, width=WIDTH):
    return transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * width,
        max_position_embeddings=64,
    )


MODELS = {
    "gpt2-lm": gpt2,
    "bert-mlm": lambda: transformers.BertForMaskedLM(bert_config()),
    "bert-classifier": lambda: transformers.BertForSequenceClassification(bert_config()),
}


def _coverage(pre: KFACPreconditioner) -> float:
    """The share the engine's summary reports (its last line: '... parameters (xx.x%)')."""
    return float(re.search(r"\(([\d.]+)%\)", pre.summary().splitlines()[-1]).group(1))


@pytest.mark.parametrize("name", list(MODELS))
def test_coverage_of_small_transformers(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    pre = KFACPreconditioner(model)
    trainable = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
    covered = {id(p) for b in pre.layers.values() for p in b.kind.params}
    share = 100.0 * sum(trainable[i] for i in covered) / sum(trainable.values())
    assert share >= 90.0, pre.summary()
    assert abs(_coverage(pre) - share) < 0.05
    skipped_types = {s.type_name for s in pre.skipped}
    assert skipped_types <= {"LayerNorm", "BertLMPredictionHead", "Linear"}, pre.summary()
    if name == "gpt2-lm":
        assert model.lm_head.weight is model.transformer.wte.weight
        uses = [u.name for u in pre.layers["transformer.wte"].kind.uses]
        assert uses == ["transformer.wte", "lm_head"]
        assert sum(b.kind.name == "Conv1D" for b in pre.layers.values()) == 8
    if name == "bert-mlm":
        uses = [u.name for u in pre.layers["bert.embeddings.word_embeddings"].kind.uses]
        assert uses == ["bert.embeddings.word_embeddings", "cls.predictions.decoder"]


def test_gpt2_tied_weight_is_preconditioned_exactly_by_its_pooled_factors():
    """One step on GPT-2 (float64): the tied wte/lm_head gradient becomes the damped solve with
    the block's factors (vocab side A, hidden side G), every other layer likewise."""
    torch.manual_seed(1)
    model = gpt2(vocab=50, width=16).double()
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    model.eval()  # no dropout
    pre = KFACPreconditioner(
        model, damping=0.03, factor_update_steps=1, inv_update_steps=1, kl_clip=None
    )
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    raw = model.transformer.wte.weight.grad.T.clone()  # W~ = weight^T (hidden x vocab)
    pre.step()
    A, G = pre.factors()["transformer.wte"]
    assert A.shape == (50, 50) and G.shape == (16, 16)
    M = torch.kron(A, G) + 0.03 * torch.eye(50 * 16, dtype=torch.float64)
    ref = torch.linalg.solve(M, raw.T.reshape(-1)).reshape(50, 16).T
    P = model.transformer.wte.weight.grad.T
    assert float((P - ref).norm() / ref.norm()) <= 1e-8


class LitLM:
    """A LightningModule around a transformers causal LM (built lazily: Lightning import)."""

    @staticmethod
    def make(model, lr):
        import pytorch_lightning as pl

        class Lit(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = model

            def training_step(self, batch, batch_idx):
                (ids,) = batch
                loss = self.model(input_ids=ids, labels=ids).loss
                self.losses.append(float(loss))
                return loss

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

        lit = Lit()
        lit.losses = []
        return lit


def _pattern_tokens(n, vocab, seq, seed=0):
    """Learnable sequences: t_{i+1} = (t_i + 3) mod vocab from a random start."""
    start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + 3 * torch.arange(seq)) % vocab


def _fit(tmp_path, kfac: bool, steps: int):
    from lightning_kfac import KFACCallback
    from tests.support.lightning import make_trainer

    torch.manual_seed(0)
    lit = LitLM.make(gpt2(vocab=64, width=32), lr=0.05)
    data = DataLoader(TensorDataset(_pattern_tokens(8 * steps, 64, 12)), batch_size=8)
    callbacks = (
        [KFACCallback(damping=1e-2, factor_update_steps=1, inv_update_steps=5)] if kfac else []
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's few-workers / small-data notices
        make_trainer(tmp_path, max_steps=steps, callbacks=callbacks).fit(lit, data)
    return lit, callbacks


@pytest.mark.slow  # two Lightning fits of 12 steps (~15 s CPU on 2 busy cores)
def test_gpt2_trains_under_the_callback(tmp_path):
    """Measured: loss 4.15 -> 1.65 in 12 steps with K-FAC, 4.15 -> 3.47 without."""
    steps = 12
    plain, _ = _fit(tmp_path, kfac=False, steps=steps)
    lit, (callback,) = _fit(tmp_path, kfac=True, steps=steps)
    factors = callback.factors()
    assert "model.transformer.wte" in factors  # the tied embedding/head is preconditioned
    assert factors["model.transformer.wte"][0].shape == (64, 64)
    losses = torch.tensor(lit.losses)
    assert torch.isfinite(losses).all()
    tail, plain_tail = losses[-3:].mean(), torch.tensor(plain.losses[-3:]).mean()
    assert tail < losses[:3].mean()  # decreasing
    assert tail <= 1.05 * plain_tail  # comparable to (or better than) no K-FAC
