"""The model zoo: real third-party definitions and two hand-written CNNs, with learnable data.

Each entry builds ``(model, batches, loss_fn)`` from a seed, with no download:

- ``gpt2``, ``bert``, ``llama``: HuggingFace ``transformers`` models from small configs (2 layers,
  width 64, vocabulary 1000, dropout off) on token sequences of a fixed random bigram chain
  (next token = a fixed successor with probability 0.9, else uniform), so the loss can fall well
  below ``ln(vocab)``. GPT-2 and Llama: causal LM loss; BERT: masked LM loss on 15% of positions.
- ``resnet``: ResNet-style CNN for 3x32x32 inputs (BasicBlock: two 3x3 convs, BatchNorm, identity
  or 1x1-conv shortcut; 3 stages of widths 16/32/64, one block each), 10 classes.
- ``mobilenet``: MobileNet-style CNN for 3x32x32 (depthwise separable blocks: 3x3 depthwise conv
  ``groups=channels`` + BatchNorm + ReLU, then 1x1 pointwise conv + BatchNorm + ReLU), 10 classes.

CNN data: a fixed random template per class plus N(0, 1) noise. No torchvision (its wheels here
break ``import pytorch_lightning`` on the CPU torch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB, WIDTH, LAYERS, HEADS, SEQ = 1000, 64, 2, 2, 32

Batch = tuple[Tensor, ...]


# -- data ------------------------------------------------------------------------------------------
def bigram_tokens(batches: int, batch_size: int, seed: int) -> list[Tensor]:
    """(batch_size, SEQ) token ids from a fixed random successor chain with 10% noise."""
    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(VOCAB, generator=gen)
    out = []
    for _ in range(batches):
        tokens = torch.empty(batch_size, SEQ, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, VOCAB, (batch_size,), generator=gen)
        for t in range(1, SEQ):
            noise = torch.rand(batch_size, generator=gen) < 0.1
            tokens[:, t] = torch.where(
                noise,
                torch.randint(0, VOCAB, (batch_size,), generator=gen),
                successor[tokens[:, t - 1]],
            )
        out.append(tokens)
    return out


def template_images(batches: int, batch_size: int, seed: int, classes: int = 10) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, 32, 32, generator=gen)
    out = []
    for _ in range(batches):
        y = torch.randint(0, classes, (batch_size,), generator=gen)
        x = templates[y] + torch.randn(batch_size, 3, 32, 32, generator=gen)
        out.append((x, y))
    return out


# -- transformers ----------------------------------------------------------------------------------
def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=LAYERS,
            n_embd=WIDTH,
            n_head=HEADS,
            vocab_size=VOCAB,
            n_positions=SEQ,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=2 * WIDTH,
            max_position_embeddings=SEQ,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=2 * WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=SEQ,
        )
    )


def causal_lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    (tokens,) = batch
    return model(input_ids=tokens, labels=tokens).loss


def masked_lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Loss on 15% of positions (fixed by the batch's own tokens), those inputs replaced by id 0."""
    (tokens,) = batch
    masked = (tokens * 7919 + torch.arange(SEQ)) % 100 < 15
    inputs = torch.where(masked, torch.zeros_like(tokens), tokens)
    labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
    return model(input_ids=inputs, labels=labels).loss


# -- CNNs ------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(c_in, width, stride=1 if i == 0 else 2))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 (groups=c_in) + BN + ReLU, pointwise 1x1 + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class MobileNet(nn.Module):
    # (out channels, stride) of the separable blocks: 6 blocks, 6 depthwise convolutions
    PLAN = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (128, 1))

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        blocks, c_in = [], 16
        for c_out, stride in self.PLAN:
            blocks.append(separable(c_in, c_out, stride))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def classification_loss(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


# -- the zoo ---------------------------------------------------------------------------------------
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable, Callable]] = {
    # name: (model builder, data builder (batches, batch_size, seed), loss)
    "gpt2": (gpt2, lambda n, b, s: [(t,) for t in bigram_tokens(n, b, s)], causal_lm_loss),
    "bert": (bert, lambda n, b, s: [(t,) for t in bigram_tokens(n, b, s)], masked_lm_loss),
    "llama": (llama, lambda n, b, s: [(t,) for t in bigram_tokens(n, b, s)], causal_lm_loss),
    "resnet": (ResNet, template_images, classification_loss),
    "mobilenet": (MobileNet, template_images, classification_loss),
}


def build(name: str, batches: int, batch_size: int, seed: int = 0):
    """``(model, batches, loss_fn)`` for zoo entry ``name``, the model initialized from ``seed``."""
    if name not in ZOO:
        raise ValueError(f"Invalid model={name!r}: allowed are {sorted(ZOO)}.")
    make_model, make_data, loss_fn = ZOO[name]
    torch.manual_seed(seed)
    model = make_model()
    return model.train(), make_data(batches, batch_size, seed + 1), loss_fn
