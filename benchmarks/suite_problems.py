"""The problems of the benchmark suite (benchmarks/suite.py): models, data, losses, batch sizes.

All data comes from scikit-learn's 8x8 digits (1,797 images; nothing is downloaded):

- ``ae_*``: deep autoencoders 64-128-64-32-8-32-64-128-64 (linear code layer; benchmarks/models.py)
  on pixels / 16 in [0, 1], Bernoulli cross-entropy summed over the 64 pixels, mean over the
  batch (Martens & Grosse 2015, sec. 13, scaled to digits). Hidden units sigmoid, tanh or ReLU;
  PyTorch's default initialization or Martens' sparse one (15 nonzero N(0, 1) incoming weights).
- ``mlp_*``: 64-128-64-10 ReLU classifier on standardized pixels, cross-entropy.
- ``cnn_*``: conv 1->16 (3x3) - ReLU - max-pool - conv 16->32 (3x3) - ReLU - average-pool 2x2 -
  linear 128->10 on the 1x8x8 standardized images, cross-entropy.
- ``lm_*``: a 2-block causal transformer language model (own definition below: d_model 32,
  2 heads, MLP 128, pre-LayerNorm, learned positions) on a token stream made of the digits:
  each image is a sequence of its 64 pixel intensities (tokens 0..16) after a start token (17);
  the model predicts every next pixel (cross-entropy averaged over tokens).

The training loss that the suite reports is the loss on the full data set (all 1,797 images;
for the language model the first 128 sequences, 8,192 tokens, to keep evaluation cheap),
evaluated outside the CPU-time clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import models

VOCAB = 18  # pixel intensities 0..16 and the start token
START = 17


@dataclass(frozen=True)
class Problem:
    """One suite problem: ``build(seed, data) -> (model, inputs, targets, loss_fn)``."""

    name: str
    batch: int
    build: Callable[[int, dict[str, Tensor]], Any]
    description: str
    eval_rows: int = 0  # > 0: the reported loss is on the first eval_rows examples only


def load_data() -> dict[str, Tensor]:
    """Digits as tensors: ``pixels`` (/16), ``standardized``, ``labels``, ``tokens`` (N x 65)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    std = (X - X.mean(0)) / X.std(0).clamp_min(1e-6)
    start = torch.full((X.shape[0], 1), START, dtype=torch.long)
    tokens = torch.cat([start, X.long()], dim=1)
    return {"pixels": X / 16.0, "standardized": std, "labels": torch.tensor(y), "tokens": tokens}


def bce_per_image(out: Tensor, target: Tensor) -> Tensor:
    """Bernoulli cross-entropy summed over pixels, mean over images."""
    return F.binary_cross_entropy_with_logits(out, target, reduction="sum") / out.shape[0]


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy averaged over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class Block(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention from plain Linear layers."""

    def __init__(self, d_model: int, heads: int, d_mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformerLM(nn.Module):
    """Token + learned position embeddings, ``layers`` blocks, final LayerNorm, Linear head."""

    def __init__(
        self,
        vocab: int = VOCAB,
        context: int = 64,
        d_model: int = 32,
        heads: int = 2,
        d_mlp: int = 128,
        layers: int = 2,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(d_model, heads, d_mlp) for _ in range(layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits for positions 1..T of ``tokens`` (B x (T+1)) from positions 0..T-1."""
        x = tokens[:, :-1]
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.ln(self.blocks(h)))


def _autoencoder(act: type, sparse: bool) -> Callable:
    def build(seed: int, data: dict[str, Tensor]):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = models.autoencoder((64, 128, 64, 32, 8), sparse_init=sparse, generator=gen, act=act)
        return model, data["pixels"], data["pixels"], bce_per_image

    return build


def _mlp(seed: int, data: dict[str, Tensor]):
    torch.manual_seed(seed)
    return models.mlp((64, 128, 64, 10)), data["standardized"], data["labels"], F.cross_entropy


def _cnn(seed: int, data: dict[str, Tensor]):
    torch.manual_seed(seed)
    images = data["standardized"].view(-1, 1, 8, 8)
    return models.cnn((1, 16, 32), image=8), images, data["labels"], F.cross_entropy


def _lm(seed: int, data: dict[str, Tensor]):
    torch.manual_seed(seed)
    return TinyTransformerLM(), data["tokens"], data["tokens"], lm_loss


def _problems() -> dict[str, Problem]:
    table = [
        (
            "ae_sigmoid_default",
            256,
            _autoencoder(nn.Sigmoid, False),
            "sigmoid autoencoder, PyTorch default init",
        ),
        (
            "ae_sigmoid_sparse",
            256,
            _autoencoder(nn.Sigmoid, True),
            "sigmoid autoencoder, sparse init",
        ),
        (
            "ae_tanh_default",
            256,
            _autoencoder(nn.Tanh, False),
            "tanh autoencoder, PyTorch default init",
        ),
        (
            "ae_relu_default",
            256,
            _autoencoder(nn.ReLU, False),
            "ReLU autoencoder, PyTorch default init",
        ),
        (
            "ae_sigmoid_default_b64",
            64,
            _autoencoder(nn.Sigmoid, False),
            "sigmoid autoencoder, PyTorch default init, batch 64",
        ),
        ("mlp_b64", 64, _mlp, "ReLU MLP classifier"),
        ("cnn_b128", 128, _cnn, "CNN classifier"),
        ("lm_b16", 16, _lm, "2-block transformer LM on digit pixel tokens"),
    ]
    problems = {name: Problem(name, batch, build, text) for name, batch, build, text in table}
    problems["lm_b16"] = Problem("lm_b16", 16, _lm, problems["lm_b16"].description, eval_rows=128)
    return problems


PROBLEMS: dict[str, Problem] = _problems()
