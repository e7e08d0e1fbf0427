"""Layer coverage against brute force (float64): nn.Embedding, weight sharing, tied weights, Conv3d.

- Embedding = a Linear layer on one-hot inputs, ``s = W^T e_i``: in the K-FAC layout
  ``W~ = weight^T`` (dim x vocab), ``A = diag(token counts) / N`` (kept as a vector),
  ``G = (1/N) sum g g^T`` with every index position an example (``g = N x`` autograd's gradient,
  as for Linear on sequences). One example: ``A (x) G`` is the exact Fisher block (torch.func).
- Weight sharing: a Linear called twice per forward adds both uses as rows,
  ``A = (1/(2B)) sum_{n,u} a a^T``, ``G = (1/(2B)) sum_{n,u} g g^T`` with ``g = B x`` autograd's
  gradient of each use (the loss is the mean over the B examples); ``sum_u g_n^u (a_n^u)^T`` is the
  per-example gradient (torch.func).
- Tied weights (one Parameter in two modules) with one holder skipped stay raw for every holder.
- Conv3d (KFC): patches from an explicit loop reproduce the conv output and the per-example
  gradients, and give ``A = (1/B) sum a a^T``, ``G = (1/(BT)) sum g g^T``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from tests.support import dense as D

EXACT = dict(factor_update_steps=1, inv_update_steps=1, kl_clip=None, factor_decay=0.5)
VOCAB, DIM = 7, 3


class Bag(nn.Module):
    """Embedding of (B, T) indices -> mean over T -> Linear classifier."""

    def __init__(self, **emb):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, **emb)
        self.out = nn.Linear(DIM, 2)

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx)).mean(1))


def _bag(**emb):
    torch.manual_seed(0)
    return Bag(**emb).double()


def _emb_grad_matrix(model):
    return model.emb.weight.grad.detach().T.clone()  # W~ = weight^T: (dim x vocab)


# --------------------------------------------------------------------------------------------
# nn.Embedding


def test_embedding_one_example_is_exact_fisher_block():
    model = _bag()
    idx, y = torch.tensor([[4]]), torch.tensor([1])
    per_ex = D.per_example_grads(model, F.cross_entropy, idx, y, "emb")  # vec of weight grad
    wt = per_ex.reshape(1, DIM, VOCAB)  # per_ex is vec (column-stacking) of (vocab x dim) = W~
    fisher = D.exact_fisher_block(torch.stack([D.vec(m) for m in wt]))
    pre = KFACPreconditioner(model, **EXACT)
    F.cross_entropy(model(idx), y).backward()
    pre.step()
    A, G = pre.factors()["emb"]
    assert torch.equal(A, torch.diag(torch.eye(VOCAB, dtype=torch.float64)[4]))
    assert D.rel_err(torch.kron(A, G), fisher) <= 1e-12


def test_embedding_factors_layout_and_per_example_gradients():
    """A = diag(counts)/N as a vector inside the engine, G by definition; vec(g a^T) per position
    summed over a sequence (divided by T) is the torch.func per-example gradient of weight^T."""
    model = _bag()
    B, T = 5, 4
    idx, y = (
        torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1)),
        torch.tensor([0, 1, 1, 0, 1]),
    )
    per_ex = D.per_example_grads(model, F.cross_entropy, idx, y, "emb")  # vec(weight grad)
    pre = KFACPreconditioner(model, **EXACT)
    with D.record(model, ["emb"]) as store:
        F.cross_entropy(model(idx), y).backward()
    _, out = store["emb"][0]
    N = B * T
    g = out.grad.reshape(N, DIM) * N
    a = F.one_hot(idx.reshape(-1), VOCAB).double()
    raw = _emb_grad_matrix(model)
    assert D.rel_err(g.T @ a / N, raw) <= 1e-12  # grad W~ = weight.grad^T = (1/N) sum g a^T
    rows = (g.reshape(B, T, DIM).transpose(1, 2) @ a.reshape(B, T, VOCAB)) / T  # (B, dim, vocab)
    # column-stacking vec of the (vocab x dim) weight grad, read back as rows: weight grad^T
    assert D.rel_err(rows, per_ex.reshape(B, DIM, VOCAB)) <= 1e-12
    pre.step()
    block = pre.layers["emb"]
    assert block.A.shape == (VOCAB,)  # diagonal kept as a vector
    counts = torch.bincount(idx.reshape(-1), minlength=VOCAB).double()
    A, G = pre.factors()["emb"]
    assert D.rel_err(A, torch.diag(counts / N)) <= 1e-15
    assert D.rel_err(G, g.T @ g / N) <= 1e-12


@pytest.mark.parametrize(
    "method,mode", [("eigen", "absolute"), ("inverse", "absolute"), ("eigen", "relative")]
)
def test_embedding_preconditioned_gradient_equals_dense_solve(method, mode):
    model = _bag()
    idx, y = (
        torch.randint(0, VOCAB - 2, (6, 3), generator=torch.Generator().manual_seed(2)),
        torch.tensor([0, 1, 1, 0, 1, 0]),
    )
    pre = KFACPreconditioner(model, damping=0.05, compute_method=method, damping_mode=mode, **EXACT)
    F.cross_entropy(model(idx), y).backward()
    raw = _emb_grad_matrix(model)
    pre.step()
    A, G = pre.factors()["emb"]
    lam = 0.05
    if mode == "relative":
        lam *= float(torch.trace(A) / VOCAB) * float(torch.trace(G) / DIM)
    solve = D.eigen_precondition if method == "eigen" else D.inverse_precondition
    P_ref = solve(A, G, raw, lam)
    assert D.rel_err(_emb_grad_matrix(model), P_ref) <= 1e-8
    # unseen tokens (never in the batch): their zero gradient columns stay zero
    assert torch.equal(model.emb.weight.grad[VOCAB - 2 :], torch.zeros(2, DIM, dtype=torch.float64))


def test_embedding_state_round_trip_and_quadratic_model():
    """Vector A survives a weights-only checkpoint; the LM model uses diag(A) (x) G."""
    model = _bag()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(model, damping=0.1, adaptive_damping=True, **EXACT)
    idx, y = (
        torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(3)),
        torch.tensor([0, 1, 1, 0]),
    )
    F.cross_entropy(model(idx), y).backward()
    raw = _emb_grad_matrix(model)
    raw_out = D.grad_matrix(model.out)
    w0 = model.emb.weight.detach().T.clone()
    o0 = D.weight_matrix(model.out.weight, model.out.bias).detach().clone()
    pre.step(opt)
    opt.step()
    factors = pre.factors()
    total = 0.0
    for grad, d, (A, G) in (
        (raw, model.emb.weight.detach().T - w0, factors["emb"]),
        (raw_out, D.weight_matrix(model.out.weight, model.out.bias).detach() - o0, factors["out"]),
    ):
        M = torch.kron(A, G) + 0.1 * torch.eye(A.shape[0] * G.shape[0], dtype=torch.float64)
        total += float(D.vec(grad) @ D.vec(d) + 0.5 * D.vec(d) @ M @ D.vec(d))
    assert pre.damping_control.model_decrease() == pytest.approx(total, rel=1e-10)
    buf = __import__("io").BytesIO()
    torch.save(pre.state_dict(), buf)
    buf.seek(0)
    pre2 = KFACPreconditioner(_bag(), damping=0.1, adaptive_damping=True, **EXACT)
    pre2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(pre2.layers["emb"].A, pre.layers["emb"].A)
    for k, v in pre.layers["emb"].decomposition.items():
        assert torch.equal(pre2.layers["emb"].decomposition[k], v), k


@pytest.mark.parametrize(
    "emb,needle",
    [
        (dict(sparse=True), "sparse=True"),
        (dict(scale_grad_by_freq=True), "scale_grad_by_freq"),
    ],
)
def test_unsupported_embeddings_are_skipped_with_a_reason(emb, needle):
    model = _bag(**emb)
    pre = KFACPreconditioner(model, **EXACT)
    assert list(pre.layers) == ["out"]
    (skipped,) = pre.skipped
    assert skipped.name == "emb" and needle in skipped.reason
    assert needle in pre.summary()
    if not emb.get("sparse"):
        F.cross_entropy(model(torch.tensor([[1, 2], [0, 3]])), torch.tensor([0, 1])).backward()
        raw = model.emb.weight.grad.clone()
        pre.step()
        assert torch.equal(model.emb.weight.grad, raw)


# --------------------------------------------------------------------------------------------
# weight sharing and tied weights


class Shared(nn.Module):
    """The same Linear applied twice per forward (weight sharing)."""

    def __init__(self, bias=True):
        super().__init__()
        self.inp = nn.Linear(4, 3)
        self.shared = nn.Linear(3, 3, bias=bias)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_used_twice_accumulates_all_uses_as_rows(bias):
    torch.manual_seed(4)
    model = Shared(bias).double()
    B = 6
    x, y = torch.randn(B, 4, dtype=torch.float64), torch.randint(0, 2, (B,))
    per_ex = D.per_example_grads(model, F.cross_entropy, x, y, "shared")
    pre = KFACPreconditioner(model, damping=0.02, **EXACT)
    with D.record(model, ["shared"]) as store:
        F.cross_entropy(model(x), y).backward()
    calls = store["shared"]
    assert len(calls) == 2
    a = torch.stack([D._append_one(inp, bias) for inp, _ in calls], 1)  # (B, uses, d_in)
    g = torch.stack([out.grad * B for _, out in calls], 1)  # (B, uses, d_out): per-example
    ref_per_ex = torch.stack([D.vec(g[n].T @ a[n]) for n in range(B)])
    assert D.rel_err(ref_per_ex, per_ex) <= 1e-12  # the rows' scale is the per-example one
    a2, g2 = a.reshape(2 * B, -1), g.reshape(2 * B, -1)
    raw = D.grad_matrix(model.shared)
    pre.step()
    A, G = pre.factors()["shared"]
    assert D.rel_err(A, a2.T @ a2 / (2 * B)) <= 1e-12
    assert D.rel_err(G, g2.T @ g2 / (2 * B)) <= 1e-12
    P_ref = D.eigen_precondition(A, G, raw, 0.02)
    assert D.rel_err(D.grad_matrix(model.shared), P_ref) <= 1e-8


class Tied(nn.Module):
    """Embedding and output projection share one Parameter (tied weights)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mid = nn.Linear(DIM, DIM)
        self.dec = nn.Linear(DIM, VOCAB, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, idx):
        return self.dec(torch.tanh(self.mid(self.emb(idx))))


def test_tied_weights_with_a_skipped_holder_are_left_raw():
    """Skipping one holder of a tied Parameter skips the shared weight for every holder (the
    tied-weight rule itself is tested in tests/core/test_layer_kinds_extra.py)."""
    torch.manual_seed(5)
    model = Tied().double()
    pre = KFACPreconditioner(model, skip_layers=["^dec$"], **EXACT)
    assert list(pre.layers) == ["mid"]
    reasons = {s.name: s.reason for s in pre.skipped}
    assert "skip_layers" in reasons["emb"] and "shared with ['dec']" in reasons["emb"]
    assert "skip_layers" in reasons["dec"]
    idx = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(6))
    F.cross_entropy(model(idx).reshape(-1, VOCAB), idx.reshape(-1)).backward()
    raw, raw_mid = model.emb.weight.grad.clone(), D.grad_matrix(model.mid)
    pre.step()
    assert torch.equal(model.emb.weight.grad, raw)
    assert not torch.equal(D.grad_matrix(model.mid), raw_mid)


# --------------------------------------------------------------------------------------------
# Conv3d


def conv_patches_nd(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches by an explicit loop over output locations, any N-d conv: (B, T, C_in * prod(k))."""
    nd = x.dim() - 2
    k, s, dil = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv.padding, str):  # "same": total d (k - 1), the extra one on the right
        left = [d * (kk - 1) // 2 for d, kk in zip(dil, k)]
        right = [d * (kk - 1) - lft for d, kk, lft in zip(dil, k, left)]
    else:
        left = right = list(conv.padding)
    pad = []
    for i in reversed(range(nd)):
        pad += [left[i], right[i]]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pad, mode=mode)
    sizes = [(xp.shape[2 + i] - dil[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    patches = []
    for loc in itertools.product(*[range(o) for o in sizes]):
        window = tuple(
            slice(loc[i] * s[i], loc[i] * s[i] + dil[i] * (k[i] - 1) + 1, dil[i]) for i in range(nd)
        )
        patches.append(xp[(slice(None), slice(None), *window)].reshape(x.shape[0], -1))
    return torch.stack(patches, 1)


CONV3D = [
    dict(kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)),
    dict(kernel_size=3, padding="same", padding_mode="circular"),
    dict(kernel_size=(1, 2, 2), stride=2, bias=False),
]


@pytest.mark.parametrize("kw", CONV3D, ids=["strided-dilated", "same-circular", "no-bias"])
def test_conv3d_factors_and_preconditioned_grad(kw):
    torch.manual_seed(7)
    conv = nn.Conv3d(2, 3, **kw).double()
    B = 3
    x = torch.randn(B, 2, 4, 5, 5, dtype=torch.float64)
    T = conv(x)[0, 0].numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * T, 2)).double()
    y = torch.randint(0, 2, (B,))
    per_ex = D.per_example_grads(model, F.cross_entropy, x, y, "0")
    pre = KFACPreconditioner(model, damping=0.03, **EXACT)
    with D.record(model, ["0"]) as store:
        F.cross_entropy(model(x), y).backward()
    inp, out = store["0"][0]
    a = conv_patches_nd(conv, inp)  # (B, T, C_in * k)
    W = D.weight_matrix(conv.weight, conv.bias).detach()
    if conv.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
    assert D.rel_err(a @ W.T, out.detach().reshape(B, 3, T).transpose(1, 2)) <= 1e-12
    g = out.grad.reshape(B, 3, T).transpose(1, 2) * B
    assert D.rel_err(torch.stack([D.vec(g[n].T @ a[n]) for n in range(B)]), per_ex) <= 1e-12
    raw = D.grad_matrix(conv)
    pre.step()
    A, G = pre.factors()["0"]
    a2, g2 = a.reshape(B * T, -1), g.reshape(B * T, -1)
    assert D.rel_err(A, a2.T @ a2 / B) <= 1e-12
    assert D.rel_err(G, g2.T @ g2 / (B * T)) <= 1e-12
    assert D.rel_err(D.grad_matrix(conv), D.eigen_precondition(A, G, raw, 0.03)) <= 1e-8


# --------------------------------------------------------------------------------------------
# DDP: the diagonal A travels through the factor all-reduce and the distributed decompositions

DDP_MODES = ["replicate", "decompositions", "gradients"]


def _ddp_batch(step, rank):
    gen = torch.Generator().manual_seed(10 * step + rank)
    return torch.randint(0, VOCAB, (3, 4), generator=gen), torch.randint(0, 2, (3,), generator=gen)


def _ddp_train(model, pre, data, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    dampings = []
    for t in range(steps):
        idx, y = data(t)
        opt.zero_grad()
        loss = F.cross_entropy(model(idx), y)
        loss.backward()
        pre.step(opt)
        opt.step()
        pre.update_damping(loss, lambda: F.cross_entropy(model(idx), y))
        dampings.append(pre.damping)
    base = model.module if hasattr(model, "module") else model
    return {
        "params": {k: v.detach().clone() for k, v in base.state_dict().items()},
        "factors": pre.factors(),
        "dampings": torch.tensor(dampings, dtype=torch.float64),
    }


def _ddp_options(mode):
    return dict(
        damping=0.05,
        factor_update_steps=1,
        inv_update_steps=2,
        kl_clip=None,
        distribute=mode,
        adaptive_damping=True,
        adaptive_damping_interval=1,
        damping_mode="relative",
        layer_overrides=[{"regex": "^out$", "compute_method": "inverse"}],
    )


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for mode in DDP_MODES:
            ddp = nn.parallel.DistributedDataParallel(_bag())
            pre = KFACPreconditioner(ddp, **_ddp_options(mode))
            results[mode] = _ddp_train(ddp, pre, lambda t: _ddp_batch(t, rank))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer still talks (SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo processes (~10-20 s on 2 cores)
def test_embedding_under_ddp_matches_single_process(tmp_path):
    """Factors, parameters and the adapted (relative) damping: equal across ranks in every
    KAISA mode and equal to one process on the concatenated batch."""
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_ddp_worker, args=(r, 2, str(tmp_path / "store"), str(tmp_path)), daemon=True
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    def both(t):
        (i0, y0), (i1, y1) = _ddp_batch(t, 0), _ddp_batch(t, 1)
        return torch.cat([i0, i1]), torch.cat([y0, y1])

    model = _bag()
    ref = _ddp_train(model, KFACPreconditioner(model, **_ddp_options("replicate")), both)
    assert len(set(ref["dampings"].tolist())) > 1  # adaptive damping moved
    for mode in DDP_MODES:
        assert torch.equal(ranks[0][mode]["dampings"], ranks[1][mode]["dampings"]), mode
        assert torch.equal(ranks[0][mode]["dampings"], ref["dampings"]), mode
        for key in ("params", "factors"):
            for name in ref[key]:
                r0, r1, rf = ranks[0][mode][key][name], ranks[1][mode][key][name], ref[key][name]
                if key == "factors":
                    assert all(torch.equal(u, v) for u, v in zip(r0, r1)), (mode, name)
                    assert max(D.rel_err(u, v) for u, v in zip(r0, rf)) <= 1e-10, (mode, name)
                else:
                    assert torch.equal(r0, r1), (mode, name)
                    assert D.rel_err(r0, rf) <= 1e-10, (mode, name)


# --------------------------------------------------------------------------------------------
# everything else stays untouched and listed


class Mixed(nn.Module):
    """LayerNorm, LSTM and MultiheadAttention around one Linear head."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.rnn(self.norm(x))
        h, _ = self.attn(h, h, h)
        return self.head(h.mean(1))


def test_unsupported_layers_are_listed_and_left_raw():
    torch.manual_seed(8)
    model = Mixed().double()
    pre = KFACPreconditioner(model, **EXACT)
    x, y = torch.randn(3, 5, 4, dtype=torch.float64), torch.tensor([0, 1, 1])
    F.cross_entropy(model(x), y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre.step()
    assert list(pre.layers) == ["head"]
    reasons = {s.name: s.reason for s in pre.skipped}
    assert set(reasons) == {"norm", "rnn", "attn", "attn.out_proj"}
    assert "not a supported layer type" in reasons["rnn"]
    # MHA's out_proj is a Linear whose weight MHA uses functionally: skipped up front, with why
    assert (
        "functionally" in reasons["attn"]
        and "MultiheadAttention 'attn'" in reasons["attn.out_proj"]
    )
    summary = pre.summary()
    assert all(name in summary for name in reasons)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, raw[name]) != name.startswith("head."), name
