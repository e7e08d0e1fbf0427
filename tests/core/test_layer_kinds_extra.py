"""More layer kinds against dense brute force (float64): transformers' Conv1D, grouped and
depthwise convolutions, nn.Embedding(padding_idx), tied weights, and ``register_layer``.

Every reference is built here from recorded layer inputs / output gradients and torch.func
per-example gradients, by the definitions (docs/layers.md):

- Conv1D (weight in x out, ``y = x W + b``): ``W~ = [W^T b]``, rows as for Linear.
- Grouped conv (K groups): per group ``A_k = (1/B) sum a^k a^k^T``, ``G_k = (1/(BT)) sum g^k g^k^T``
  (patches of the group's input channels, gradients of its output channels); the preconditioned
  gradient is ``(blockdiag_k(A_k (x) G_k) + damping I)^-1 vec(grad)``.
- Embedding with padding index p: the positions holding p are left out of both factors.
- Tied weights: one block in the first holder's orientation; every use's rows pooled, a flipped
  holder (``W~`` transposed) feeding its input rows to G and its gradient rows to A.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import lightning_kfac
from lightning_kfac import KFACPreconditioner, LayerKind, register_layer, unregister_layer
from tests.support import dense as D

EXACT = dict(factor_update_steps=1, inv_update_steps=1, kl_clip=None, factor_decay=0.5)


def per_example(model, loss_fn, x, y, name):
    """``d l_n / d param`` for every example n (torch.func), shape (B, *param.shape)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)[name]


# --------------------------------------------------------------------------------------------
# transformers' Conv1D (GPT-2): a Linear with its weight stored transposed


class Seq(nn.Module):
    """(B, T, 4) -> projection -> tanh -> mean over T -> Linear head."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(1))


def _conv1d_and_twin():
    utils = pytest.importorskip(
        "transformers.pytorch_utils", reason="transformers (dev extra) not installed"
    )
    Conv1D = utils.Conv1D
    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight (4 x 6)
    with torch.no_grad():
        conv.bias.normal_()
    model = Seq(conv).double()
    twin = Seq(nn.Linear(4, 6)).double()
    with torch.no_grad():
        twin.proj.weight.copy_(model.proj.weight.T)
        twin.proj.bias.copy_(model.proj.bias)
        twin.head.load_state_dict(model.head.state_dict())
    return model, twin


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_transformers_conv1d_factors_and_preconditioned_grad(method):
    model, twin = _conv1d_and_twin()
    B, T = 5, 3
    x = torch.randn(B, T, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1, 1, 0])
    pre = KFACPreconditioner(model, damping=0.03, compute_method=method, **EXACT)
    assert pre.layers["proj"].kind.name == "Conv1D"
    with D.record(model, ["proj"]) as store:
        F.cross_entropy(model(x), y).backward()
    ((inp, out),) = store["proj"]
    N = B * T
    a = torch.cat([inp.reshape(N, 4), torch.ones(N, 1, dtype=torch.float64)], 1)
    g = out.grad.reshape(N, 6) * N
    raw = torch.cat([model.proj.weight.grad.T, model.proj.bias.grad[:, None]], 1)  # W~ = [W^T b]
    assert D.rel_err(g.T @ a / N, raw) <= 1e-12  # grad W~ = (1/N) sum g a^T
    per_ex = per_example(model, F.cross_entropy, x, y, "proj.weight")  # (B, 4, 6)
    rows = (g.reshape(B, T, 6).transpose(1, 2) @ a.reshape(B, T, 5)) / T
    assert D.rel_err(rows[:, :, :4], per_ex.transpose(1, 2)) <= 1e-12
    pre.step()
    A, G = pre.factors()["proj"]
    assert D.rel_err(A, a.T @ a / N) <= 1e-12 and D.rel_err(G, g.T @ g / N) <= 1e-12
    solve = D.eigen_precondition if method == "eigen" else D.inverse_precondition
    P = torch.cat([model.proj.weight.grad.T, model.proj.bias.grad[:, None]], 1)
    assert D.rel_err(P, solve(A, G, raw, 0.03)) <= 1e-8
    # an nn.Linear holding W^T gives the same factors and the transposed preconditioned weight
    pre_twin = KFACPreconditioner(twin, damping=0.03, compute_method=method, **EXACT)
    F.cross_entropy(twin(x), y).backward()
    pre_twin.step()
    At, Gt = pre_twin.factors()["proj"]
    assert D.rel_err(At, A) <= 1e-12 and D.rel_err(Gt, G) <= 1e-12
    assert D.rel_err(twin.proj.weight.grad, model.proj.weight.grad.T) <= 1e-10


# --------------------------------------------------------------------------------------------
# grouped and depthwise convolutions: one KFC block per group

GROUPED = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    dict(in_channels=4, out_channels=8, kernel_size=3, groups=4),  # depthwise, multiplier 2
    dict(in_channels=4, out_channels=4, kernel_size=2, stride=2, groups=4, bias=False),
]


def _grouped_model(kw):
    torch.manual_seed(2)
    conv = nn.Conv2d(**kw)
    T = conv(torch.zeros(1, 4, 5, 5))[0, 0].numel()
    return nn.Sequential(
        conv, nn.Tanh(), nn.Flatten(), nn.Linear(kw["out_channels"] * T, 2)
    ).double()


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("kw", GROUPED, ids=["groups2", "depthwise-x2", "depthwise-strided-nobias"])
def test_grouped_conv_per_group_factors_and_preconditioned_grad(kw, method):
    model = _grouped_model(kw)
    conv = model[0]
    K, bias = conv.groups, conv.bias is not None
    cin, cout = conv.in_channels // K, conv.out_channels // K
    B = 3
    x = torch.randn(B, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 1])
    per_ex = per_example(model, F.cross_entropy, x, y, "0.weight")  # (B, C_out, cin, kh, kw)
    pre = KFACPreconditioner(model, damping=0.02, compute_method=method, **EXACT)
    with D.record(model, ["0"]) as store:
        F.cross_entropy(model(x), y).backward()
    ((inp, out),) = store["0"]
    T = out[0, 0].numel()
    raw = [
        D.weight_matrix(
            conv.weight.grad[k * cout : (k + 1) * cout],
            conv.bias.grad[k * cout : (k + 1) * cout] if bias else None,
        ).clone()
        for k in range(K)
    ]
    As, Gs = [], []
    for k in range(K):
        a = D.conv_patches_loop(conv, inp[:, k * cin : (k + 1) * cin])  # (B, T, cin * kernel)
        if bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
        g = out.grad[:, k * cout : (k + 1) * cout].reshape(B, cout, T).transpose(1, 2) * B
        ex = per_ex[:, k * cout : (k + 1) * cout].reshape(B, cout, -1)
        assert D.rel_err(g.transpose(1, 2) @ a[..., : ex.shape[2]], ex) <= 1e-12  # rows exact
        a2, g2 = a.reshape(B * T, -1), g.reshape(B * T, -1)
        As.append(a2.T @ a2 / B)
        Gs.append(g2.T @ g2 / (B * T))
    pre.step()
    A, G = pre.factors()["0"]
    d = cin * conv.weight[0, 0].numel() + bias
    assert A.shape == (K, d, d) and G.shape == (K, cout, cout)
    assert D.rel_err(A, torch.stack(As)) <= 1e-12 and D.rel_err(G, torch.stack(Gs)) <= 1e-12
    P = [
        D.weight_matrix(
            conv.weight.grad[k * cout : (k + 1) * cout],
            conv.bias.grad[k * cout : (k + 1) * cout] if bias else None,
        )
        for k in range(K)
    ]
    if method == "eigen":  # one dense solve of the block-diagonal Fisher over all groups
        M = torch.block_diag(*[torch.kron(a, g) for a, g in zip(As, Gs)])
        M = M + 0.02 * torch.eye(M.shape[0], dtype=M.dtype)
        ref = torch.linalg.solve(M, torch.cat([D.vec(r) for r in raw]))
        assert D.rel_err(torch.cat([D.vec(p) for p in P]), ref) <= 1e-8
    else:  # factored Tikhonov with each group's own pi
        for k in range(K):
            assert D.rel_err(P[k], D.inverse_precondition(As[k], Gs[k], raw[k], 0.02)) <= 1e-8


def test_depthwise_conv_is_preconditioned_batched_in_the_summary():
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=64)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3))
    pre = KFACPreconditioner(model, **EXACT)
    assert "0" in pre.layers and pre.layers["0"].kind.groups == 64
    assert "64 x 10x10" in pre.summary() and "64 x 1x1" in pre.summary()
    F.cross_entropy(model(torch.randn(2, 64, 6, 6)), torch.tensor([0, 2])).backward()
    raw = conv.weight.grad.clone()
    pre.step()
    A, G = pre.factors()["0"]
    assert A.shape == (64, 10, 10) and G.shape == (64, 1, 1)
    assert pre.counters["decompositions"] == 2  # one batched decomposition for all 64 groups
    assert torch.isfinite(conv.weight.grad).all() and not torch.equal(conv.weight.grad, raw)


def test_grouped_conv_with_ekfac_is_skipped_with_the_reason():
    model = _grouped_model(GROUPED[0])
    pre = KFACPreconditioner(model, compute_method="ekfac")
    reasons = {s.name: s.reason for s in pre.skipped}
    assert "grouped convolutions" in reasons["0"] and "layer_overrides" in reasons["0"]
    pre = KFACPreconditioner(
        model, compute_method="ekfac", layer_overrides=[{"regex": "^0$", "compute_method": "eigen"}]
    )
    assert "0" in pre.layers


# --------------------------------------------------------------------------------------------
# nn.Embedding(padding_idx): padding positions are left out of both factors

VOCAB, DIM, PAD = 7, 3, 0


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.out = nn.Linear(DIM, 2)

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx)).mean(1))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_embedding_padding_positions_are_left_out_of_the_factors(method):
    torch.manual_seed(4)
    model = Bag().double()
    idx = torch.tensor([[1, 0, 3, 0], [2, 2, 0, 5], [0, 0, 4, 1]])
    y = torch.tensor([0, 1, 1])
    pre = KFACPreconditioner(model, damping=0.05, compute_method=method, **EXACT)
    with D.record(model, ["emb"]) as store:
        F.cross_entropy(model(idx), y).backward()
    ((_, out),) = store["emb"]
    N = idx.numel()
    keep = idx.reshape(-1) != PAD
    Nv = int(keep.sum())
    g = out.grad.reshape(N, DIM) * N  # per-example scale of the loss's mean over all positions
    onehot = F.one_hot(idx.reshape(-1), VOCAB).double()
    raw = model.emb.weight.grad.T.clone()
    # the kept rows alone give the whole gradient (the padding column is zero)
    assert D.rel_err(g[keep].T @ onehot[keep] / N, raw) <= 1e-12
    assert torch.equal(raw[:, PAD], torch.zeros(DIM, dtype=torch.float64))
    pre.step()
    A, G = pre.factors()["emb"]
    assert D.rel_err(A, onehot[keep].T @ onehot[keep] / Nv) <= 1e-15 and A[PAD, PAD] == 0
    assert D.rel_err(G, g[keep].T @ g[keep] / Nv) <= 1e-12
    solve = D.eigen_precondition if method == "eigen" else D.inverse_precondition
    assert D.rel_err(model.emb.weight.grad.T, solve(A, G, raw, 0.05)) <= 1e-8
    assert torch.equal(model.emb.weight.grad[PAD], torch.zeros(DIM, dtype=torch.float64))


def test_padding_embedding_with_ekfac_is_skipped_with_the_reason():
    pre = KFACPreconditioner(Bag(), compute_method="ekfac")
    assert list(pre.layers) == ["out"]
    assert "padding_idx" in {s.name: s.reason for s in pre.skipped}["emb"]


def test_all_padding_batch_adds_nothing():
    model = Bag().double()
    pre = KFACPreconditioner(model, **EXACT)
    F.cross_entropy(model(torch.zeros(2, 3, dtype=torch.long)), torch.tensor([0, 1])).backward()
    pre.step()
    assert "emb" not in pre.factors() and pre.counters["nonfinite_estimates"] == 0
    assert torch.isfinite(model.out.weight.grad).all()


# --------------------------------------------------------------------------------------------
# weight sharing: one block, every use's rows pooled


class TiedLM(nn.Module):
    """Embedding and output head holding one Parameter; ``head_first`` registers the head first
    (then the block takes the head's orientation)."""

    def __init__(self, head_first=False):
        super().__init__()
        if head_first:
            self.dec = nn.Linear(DIM, VOCAB, bias=False)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mid = nn.Linear(DIM, DIM)
        if not head_first:
            self.dec = nn.Linear(DIM, VOCAB, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, idx):
        return self.dec(torch.tanh(self.mid(self.emb(idx))))


def _lm_loss(logits, idx):
    return F.cross_entropy(logits.reshape(-1, VOCAB), idx.reshape(-1))


@pytest.mark.parametrize("head_first", [False, True], ids=["embedding-first", "head-first"])
def test_tied_embedding_and_head_pool_their_rows(head_first):
    torch.manual_seed(5)
    model = TiedLM(head_first).double()
    pre = KFACPreconditioner(model, damping=0.02, **EXACT)
    name = "dec" if head_first else "emb"
    assert sorted(pre.layers) == sorted([name, "mid"])
    assert pre.layers[name].kind.type_name in ("Embedding+Linear", "Linear+Embedding")
    assert not [s for s in pre.skipped if s.name in ("emb", "dec")]
    idx = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(6))
    with D.record(model, ["emb", "dec"]) as store:
        _lm_loss(model(idx), idx).backward()
    ((_, e_out),) = store["emb"]
    ((h, d_out),) = store["dec"]
    N = idx.numel()  # rows of each use (both see every position)
    onehot = F.one_hot(idx.reshape(-1), VOCAB).double()
    g_emb = e_out.grad.reshape(N, DIM) * N  # embedding use: dim side
    g_dec = d_out.grad.reshape(N, VOCAB) * N  # head use: vocab side
    h = h.reshape(N, DIM)
    W_grad = model.emb.weight.grad.clone()  # (vocab x dim): the sum of both uses
    assert D.rel_err((onehot.T @ g_emb + g_dec.T @ h) / N, W_grad) <= 1e-12
    vocab_side = (onehot.T @ onehot + g_dec.T @ g_dec) / (2 * N)
    dim_side = (g_emb.T @ g_emb + h.T @ h) / (2 * N)
    pre.step()
    A, G = pre.factors()[name]
    if head_first:  # W~ = weight (vocab x dim): A on the dim side, G on the vocab side
        ref_A, ref_G, raw = dim_side, vocab_side, W_grad
        P = model.emb.weight.grad
    else:  # W~ = weight^T (dim x vocab): A on the vocab side
        ref_A, ref_G, raw = vocab_side, dim_side, W_grad.T
        P = model.emb.weight.grad.T
    assert D.rel_err(A, ref_A) <= 1e-12 and D.rel_err(G, ref_G) <= 1e-12
    assert D.rel_err(P, D.eigen_precondition(ref_A, ref_G, raw, 0.02)) <= 1e-8


class TwoHeads(nn.Module):
    """Two Linear modules holding one weight (and the same bias, or each its own)."""

    def __init__(self, shared_bias):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        if shared_bias:
            self.b.bias = self.a.bias
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("shared_bias", [True, False])
def test_weight_held_by_two_linear_modules(shared_bias):
    torch.manual_seed(7)
    model = TwoHeads(shared_bias).double()
    pre = KFACPreconditioner(model, damping=0.02, **EXACT)
    assert sorted(pre.layers) == ["a", "out"]
    skipped = {s.name: s.reason for s in pre.skipped}
    assert ("b" in skipped) != shared_bias  # an unshared bias stays raw, and is listed
    B = 5
    x, y = torch.randn(B, 3, dtype=torch.float64), torch.randint(0, 2, (B,))
    with D.record(model, ["a", "b"]) as store:
        F.cross_entropy(model(x), y).backward()
    a = torch.cat([D._append_one(store[n][0][0], shared_bias) for n in "ab"])
    g = torch.cat([store[n][0][1].grad * B for n in "ab"])
    raw = D.weight_matrix(model.a.weight.grad, model.a.bias.grad if shared_bias else None).clone()
    raw_b_bias = model.b.bias.grad.clone()
    pre.step()
    A, G = pre.factors()["a"]
    assert D.rel_err(A, a.T @ a / (2 * B)) <= 1e-12 and D.rel_err(G, g.T @ g / (2 * B)) <= 1e-12
    P = D.weight_matrix(model.a.weight.grad, model.a.bias.grad if shared_bias else None)
    assert D.rel_err(P, D.eigen_precondition(A, G, raw, 0.02)) <= 1e-8
    if not shared_bias:
        assert torch.equal(model.b.bias.grad, raw_b_bias)


def test_weight_also_held_by_an_unsupported_module_is_refused():
    class Holder(nn.Module):  # holds the weight and uses it functionally
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x @ self.weight

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.holder = Holder(self.lin.weight)

        def forward(self, x):
            return self.holder(self.lin(x))

    pre = KFACPreconditioner(Model())
    reasons = {s.name: s.reason for s in pre.skipped}
    assert not pre.layers and "tied to 'holder'" in reasons["lin"]


# --------------------------------------------------------------------------------------------
# register_layer: a user-defined module type


class MyDense(nn.Module):
    """A user module computing a Linear map functionally (weight out x in)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class RowMajor(nn.Module):
    """A user module storing its map transposed, without bias: ``y = x @ W``, W (in x out)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n_in, n_out) * 0.5)

    def forward(self, x):
        return x @ self.W


class RowMajorKind(LayerKind):
    """``W~ = W^T`` (out x in); a = the input rows, g = the output-gradient rows."""

    name = "RowMajor"

    @property
    def weight(self):
        return self.module.W

    @property
    def params(self):
        return (self.module.W,)

    def a_dim(self):
        return self.module.W.shape[0]

    def g_dim(self):
        return self.module.W.shape[1]

    def input_rows(self, x):
        rows = x.reshape(-1, x.shape[-1])
        return rows, rows.shape[0]

    def grad_rows(self, g):
        rows = g.reshape(-1, g.shape[-1])
        return rows, rows.shape[0], rows.shape[0]

    def grad_matrix(self):
        return None if self.module.W.grad is None else self.module.W.grad.T

    def set_grad(self, matrix):
        self.module.W.grad.copy_(matrix.T)

    def as_matrix(self, weight, bias):
        return weight.T


@pytest.fixture
def registry():
    yield register_layer
    unregister_layer(MyDense)
    unregister_layer(RowMajor)


def _user_model(layer):
    torch.manual_seed(8)
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 2)).double()


def test_register_layer_maps_a_user_class_to_the_linear_kind(registry):
    model = _user_model(MyDense(3, 4))
    assert "0" not in KFACPreconditioner(model).layers  # unknown until registered
    assert "register_layer" in {s.name: s.reason for s in KFACPreconditioner(model).skipped}["0"]
    registry(MyDense, "linear")
    twin = _user_model(nn.Linear(3, 4))
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    grads = []
    for m in (model, twin):
        pre = KFACPreconditioner(m, damping=0.02, **EXACT)
        assert "0" in pre.layers
        F.cross_entropy(m(x), y).backward()
        pre.step()
        grads.append((pre.factors()["0"], m[0].weight.grad, m[0].bias.grad))
    (A, G), wg, bg = grads[0]
    (At, Gt), wt, bt = grads[1]
    assert torch.equal(A, At) and torch.equal(G, Gt)
    assert torch.equal(wg, wt) and torch.equal(bg, bt)


def test_register_layer_with_a_kind_class_is_exact(registry):
    registry(RowMajor, RowMajorKind)
    model = _user_model(RowMajor(3, 4))
    pre = KFACPreconditioner(model, damping=0.02, **EXACT)
    assert pre.layers["0"].kind.name == "RowMajor"
    B = 6
    x, y = torch.randn(B, 3, dtype=torch.float64), torch.randint(0, 2, (B,))
    with D.record(model, ["0"]) as store:
        F.cross_entropy(model(x), y).backward()
    ((inp, out),) = store["0"]
    g = out.grad * B
    raw = model[0].W.grad.T.clone()
    pre.step()
    A, G = pre.factors()["0"]
    assert D.rel_err(A, inp.T @ inp / B) <= 1e-12 and D.rel_err(G, g.T @ g / B) <= 1e-12
    assert D.rel_err(model[0].W.grad.T, D.eigen_precondition(A, G, raw, 0.02)) <= 1e-8


@pytest.mark.parametrize(
    "args,needle",
    [
        ((int, "linear"), "module_class"),
        ((MyDense, "dense"), "kind='dense'"),
        ((MyDense, nn.Linear), "kind="),
    ],
)
def test_register_layer_rejects_bad_input(args, needle):
    with pytest.raises(ValueError, match=needle):
        register_layer(*args)
    assert lightning_kfac.register_layer is register_layer


def test_mc_fisher_routes_sampled_gradients_of_both_tied_uses():
    """fisher_type="mc": the sampled gradients of each use land on the side its rows belong to
    (embedding-first block: the head's on the vocab side A, the embedding's on the hidden side
    G), next to the forward rows (token counts on A, the head's inputs on G)."""
    torch.manual_seed(9)
    model = TiedLM().double()
    pre = KFACPreconditioner(model, fisher_type="mc", **EXACT)
    idx = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(10))
    with D.record(model, ["dec"]) as store:
        logits = model(idx)
        pre.mc_backward(logits)
        _lm_loss(logits, idx).backward()
    pre.step()
    A, G = pre.factors()["emb"]
    N = idx.numel()
    counts = torch.bincount(idx.reshape(-1), minlength=VOCAB).double()
    h = store["dec"][0][0].reshape(N, DIM)
    rest_A = A - torch.diag(counts) / (2 * N)  # the head's sampled gradient rows
    rest_G = G - h.T @ h / (2 * N)  # the embedding's sampled gradient rows
    for rest in (rest_A, rest_G):
        e = torch.linalg.eigvalsh(rest)
        assert e.min() >= -1e-12 and e.max() > 1e-6


def test_stacked_and_diagonal_factors_travel_whole_in_the_factor_all_reduce():
    """Per-group factors (K x d x d) and diagonal ones are summed whole, matrices by triangles."""
    from lightning_kfac.core.distributed import Communicator, all_reduce_factors_

    class Doubling(Communicator):  # two ranks holding the same numbers
        world_size = 2

        def all_reduce_sum_(self, tensors):
            for t in tensors:
                t.mul_(2)

    gen = torch.Generator().manual_seed(11)
    m = torch.randn(3, 4, 4, dtype=torch.float64, generator=gen)
    stacked = m @ m.mT
    s = torch.randn(5, 5, dtype=torch.float64, generator=gen)
    dense, diag = s @ s.T, torch.rand(6, dtype=torch.float64, generator=gen)
    estimates = [stacked.clone(), dense.clone(), diag.clone()]
    flags = torch.ones(3, dtype=torch.float64)
    all_reduce_factors_(Doubling(), flags, estimates)
    for got, ref in zip(estimates, (stacked, dense, diag)):
        assert torch.allclose(got, 2 * ref, rtol=0, atol=1e-12)
    assert torch.equal(flags, torch.full((3,), 2.0, dtype=torch.float64))


def test_grouped_conv_quadratic_model_and_state_round_trip():
    """Adaptive damping's model decrease uses the block-diagonal Fisher over groups, and the
    stacked factors / decompositions survive a weights-only checkpoint bit for bit."""
    model = _grouped_model(GROUPED[1])
    conv = model[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(model, damping=0.1, adaptive_damping=True, **EXACT)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    y = torch.tensor([1, 0, 1])
    F.cross_entropy(model(x), y).backward()
    K = conv.groups

    def as_groups(w, b):
        return torch.cat([w.reshape(K, -1, w[0].numel()), b.reshape(K, -1, 1)], 2)

    raw = as_groups(conv.weight.grad, conv.bias.grad).clone()
    raw_head = D.grad_matrix(model[3])
    w0 = as_groups(conv.weight, conv.bias).detach().clone()
    h0 = D.weight_matrix(model[3].weight, model[3].bias).detach().clone()
    pre.step(opt)
    opt.step()
    (A, G), (Ah, Gh) = pre.factors()["0"], pre.factors()["3"]
    d = as_groups(conv.weight, conv.bias).detach() - w0
    dh = D.weight_matrix(model[3].weight, model[3].bias).detach() - h0
    M = torch.block_diag(*[torch.kron(a, g) for a, g in zip(A, G)])
    Mh = torch.kron(Ah, Gh)
    total = 0.0
    for grad_, delta, mat in ((raw, d, M), (raw_head, dh, Mh)):
        v = torch.cat([D.vec(m) for m in delta]) if delta.dim() == 3 else D.vec(delta)
        gv = torch.cat([D.vec(m) for m in grad_]) if grad_.dim() == 3 else D.vec(grad_)
        mat = mat + 0.1 * torch.eye(mat.shape[0], dtype=torch.float64)
        total += float(gv @ v + 0.5 * v @ mat @ v)
    assert pre.damping_control.model_decrease() == pytest.approx(total, rel=1e-10)
    buf = __import__("io").BytesIO()
    torch.save(pre.state_dict(), buf)
    buf.seek(0)
    pre2 = KFACPreconditioner(
        _grouped_model(GROUPED[1]), damping=0.1, adaptive_damping=True, **EXACT
    )
    pre2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(pre2.layers["0"].A, pre.layers["0"].A)
    for k, v in pre.layers["0"].decomposition.items():
        assert torch.equal(pre2.layers["0"].decomposition[k], v), k
