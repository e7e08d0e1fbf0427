"""compute_method="ekfac" (George et al. 2018) against brute force (core/ekfac.py).

The scaling is ``s = E_n[(Q_G^T dW~_n Q_A)^2]`` with per-example gradients ``dW~_n`` from
``torch.func`` (Linear: one row per example; conv: the whole example, i.e. summed over output
locations; Linear on sequences: every position is an example, docs/conventions.md). ``P`` is checked
against a dense solve of ``(Q_A (x) Q_G) diag(vec s) (Q_A (x) Q_G)^T + damping I``. Everything in
float64; the engine's own eigenbases are used where only the scaling is under test (eigenvectors
are unique up to sign, and squares do not see the sign).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner
from tests.support.dense import (
    brute_factors,
    grad_matrix,
    linear_rows,
    per_example_grads,
    record,
    rel_err,
    unvec,
    vec,
)

DT = torch.float64
DAMPING = 1e-2


def _per_example(model: nn.Module, x: Tensor, y: Tensor, layer: str, out: int) -> Tensor:
    """``dW~_n`` as (B, out, a_dim) matrices, from torch.func."""
    per = per_example_grads(model, F.cross_entropy, x, y, layer)
    return torch.stack([unvec(v, out) for v in per])


def _rotated_sq_mean(dW: Tensor, QA: Tensor, QG: Tensor) -> Tensor:
    return (QG.T @ dW @ QA).square().mean(0)


def _dense_ekfac_solve(QA: Tensor, QG: Tensor, s: Tensor, grad: Tensor, damping: float) -> Tensor:
    Q = torch.kron(QA.contiguous(), QG.contiguous())  # kron can fail on mixed layouts
    F_ekfac = Q @ torch.diag(vec(s)) @ Q.T
    eye = torch.eye(F_ekfac.shape[0], dtype=DT)
    return unvec(torch.linalg.solve(F_ekfac + damping * eye, vec(grad)), grad.shape[0])


def _one_step(model: nn.Module, x: Tensor, y: Tensor, names, **options):
    """One factor step with decay 0 and a refresh; returns pre, raw grads, recorded store."""
    pre = KFACPreconditioner(
        model,
        compute_method="ekfac",
        factor_decay=0.0,
        damping=DAMPING,
        factor_update_steps=1,
        inv_update_steps=1,
        kl_clip=None,
        **options,
    )
    modules = dict(model.named_modules())
    with record(model, names) as store:
        F.cross_entropy(model(x), y).backward()
    raw = {n: grad_matrix(modules[n]) for n in names}
    pre.step()
    return pre, raw, store


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_scaling_and_step_equal_brute_force_after_refresh(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).to(DT)
        x = torch.randn(12, 5, dtype=DT)
        names = {"0": 7, "2": 4}
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4)
        ).to(DT)
        x = torch.randn(6, 2, 4, 4, dtype=DT)
        names = {"0": 3, "3": 4}
    y = torch.randint(0, 4, (x.shape[0],))
    pre, raw, store = _one_step(model, x, y, list(names))
    factors = brute_factors(model, store)
    modules = dict(model.named_modules())
    for name, out in names.items():
        dW = _per_example(model, x, y, name, out)
        dec = pre.blocks[name].decomposition
        # 1) the scaling, in the engine's basis, equals its definition
        s_engine_basis = _rotated_sq_mean(dW, dec["QA"], dec["QG"])
        assert torch.allclose(dec["scale"], s_engine_basis, rtol=1e-9, atol=1e-14), name
        # 2) the preconditioned gradient equals the fully independent dense solve
        A, G = factors[name]
        QA, QG = torch.linalg.eigh(A)[1], torch.linalg.eigh(G)[1]
        s = _rotated_sq_mean(dW, QA, QG)
        expected = _dense_ekfac_solve(QA, QG, s, raw[name], DAMPING)
        assert rel_err(grad_matrix(modules[name]), expected) < 1e-8, name


def test_sequence_linear_uses_one_example_per_position() -> None:
    """Linear on (B, T, d): every position is an example (docs/conventions.md),
    g = N x autograd grad."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(3, 5), nn.Linear(5, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.inner(x)).mean(1))

    torch.manual_seed(1)
    model = Seq().to(DT)
    x, y = torch.randn(4, 6, 3, dtype=DT), torch.randint(0, 4, (4,))
    pre, _, store = _one_step(model, x, y, ["inner"])
    ((inp, out),) = store["inner"]
    a, g = linear_rows(model.inner, inp, out)
    dec = pre.blocks["inner"].decomposition
    rows = g[:, :, None] * a[:, None, :]  # per-position g a^T, N = B T rows
    assert torch.allclose(
        dec["scale"], _rotated_sq_mean(rows, dec["QA"], dec["QG"]), rtol=1e-9, atol=1e-14
    )


def test_single_example_ekfac_equals_kfac() -> None:
    """One example: dW = g a^T, A = a a^T, G = g g^T, so s = e_G e_A^T and EKFAC == K-FAC."""
    torch.manual_seed(2)
    x, y = torch.randn(1, 5, dtype=DT), torch.tensor([1])
    grads = {}
    for method in ("eigen", "ekfac"):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        pre = KFACPreconditioner(model, compute_method=method, damping=DAMPING, kl_clip=None)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        grads[method] = [p.grad.clone() for p in model.parameters()]
    for p, q in zip(grads["eigen"], grads["ekfac"]):
        assert rel_err(q, p) < 1e-8


def test_running_average_between_refreshes() -> None:
    """s <- decay s + (1-decay) s^ every factor step; a refresh restarts it
    at the new basis's s^."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    decay = 0.5
    pre = KFACPreconditioner(
        model,
        compute_method="ekfac",
        factor_decay=decay,
        damping=DAMPING,
        factor_update_steps=1,
        inv_update_steps=3,
    )
    expected: dict[str, Tensor] = {}
    for t in range(5):
        x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
        per = {n: _per_example(model, x, y, n, o) for n, o in (("0", 5), ("2", 3))}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step(opt)
        for name, dW in per.items():
            dec = pre.blocks[name].decomposition
            s_hat = _rotated_sq_mean(dW, dec["QA"], dec["QG"])
            if t % 3 == 0:  # refresh: re-estimated in the new basis, K-FAC's eigenvalues dropped
                expected[name] = s_hat
            else:
                expected[name] = decay * expected[name] + (1 - decay) * s_hat
            assert torch.allclose(dec["scale"], expected[name], rtol=1e-9, atol=1e-14), (t, name)
        opt.step()


def test_off_clock_refresh_at_end_of_warmup_rotates_in_the_new_basis() -> None:
    """warmup_steps=2 adds a refresh at t=2 (inv_update_steps=10): that step's rows must be kept
    and rotated after the refresh, not in the stale basis (decay 0: s = this step's s^)."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    pre = KFACPreconditioner(
        model,
        compute_method="ekfac",
        factor_decay=0.0,
        warmup_steps=2,
        factor_update_steps=1,
        inv_update_steps=10,
    )
    for _t in range(3):
        x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
        per = {n: _per_example(model, x, y, n, o) for n, o in (("0", 5), ("2", 3))}
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    assert pre.counters["decompositions"] == 2 * 2  # t = 0 and the end of warm-up, t = 2
    for name, dW in per.items():
        dec = pre.blocks[name].decomposition
        s = _rotated_sq_mean(dW, dec["QA"], dec["QG"])
        assert torch.allclose(dec["scale"], s, rtol=1e-9, atol=1e-14), name


def test_micro_batches_equal_one_batch() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 3)).to(DT)
    x, y = torch.randn(8, 2, 6, dtype=DT), torch.randint(0, 3, (8,))
    scales = []
    for k in (1, 2):
        pre = KFACPreconditioner(model, compute_method="ekfac", factor_update_steps=1)
        pre.grad_scale = 1.0 / k
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (F.cross_entropy(model(xs), ys) / k).backward()
        pre.step()
        scales.append({n: b.decomposition["scale"].clone() for n, b in pre.blocks.items()})
        pre.remove()
        model.zero_grad()
    for name, s in scales[0].items():
        assert torch.allclose(s, scales[1][name], rtol=1e-10, atol=1e-15), name


def test_mc_enumerated_scaling_is_the_true_fisher_diagonal() -> None:
    """With fisher_type="mc" and all classes enumerated, s = E_n E_{c~p}[(Q_G^T dW_nc Q_A)^2]."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).to(DT)
    x = torch.randn(7, 4, dtype=DT)
    pre = KFACPreconditioner(
        model,
        compute_method="ekfac",
        fisher_type="mc",
        factor_decay=0.0,
        factor_update_steps=1,
        inv_update_steps=1,
    )
    model(x)
    pre.mc.backward(enumerate_classes=True)
    pre.step()
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    for name, out in (("0", 5), ("2", 3)):
        dec = pre.blocks[name].decomposition
        s = 0
        for c in range(3):
            dW = _per_example(model, x, torch.full((7,), c), name, out)
            s = s + (probs[:, c, None, None] * (dec["QG"].T @ dW @ dec["QA"]).square()).mean(0)
        assert torch.allclose(dec["scale"], s, rtol=1e-9, atol=1e-14), name


def test_ekfac_config_and_state() -> None:
    """The scaling is part of the saved decomposition; eigen layers carry no scaling."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    pre = KFACPreconditioner(
        model, compute_method="eigen", layer_overrides=[{"regex": "^2$", "compute_method": "ekfac"}]
    )
    F.cross_entropy(model(torch.randn(5, 3, dtype=DT)), torch.randint(0, 2, (5,))).backward()
    pre.step()
    state = pre.state_dict()["layers"]
    assert "scale" in state["2"]["decomposition"] and "scale" not in state["0"]["decomposition"]
    assert state["2"]["decomposition"]["scale"].shape == (2, 5)


def test_embedding_scaling_and_step_equal_brute_force() -> None:
    """nn.Embedding: A is diagonal (no Q_A), dW~_n = g_n e_{i_n}^T in the weight^T layout."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(8)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    idx, y = torch.tensor([0, 2, 2, 5, 1, 2, 0, 3]), torch.randint(0, 3, (8,))
    pre = KFACPreconditioner(
        model,
        compute_method="ekfac",
        factor_decay=0.0,
        damping=DAMPING,
        factor_update_steps=1,
        inv_update_steps=1,
        kl_clip=None,
    )
    assert "0" in pre.blocks
    F.cross_entropy(model(idx), y).backward()
    raw = model[0].weight.grad.T.clone()  # g_dim x a_dim = embedding_dim x num_embeddings
    pre.step()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, i, t):
        return F.cross_entropy(functional_call(model, p, (i[None],)), t[None])

    dW = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, idx, y)["0.weight"].transpose(1, 2)
    dec = pre.blocks["0"].decomposition
    assert "QA" not in dec
    s = (dec["QG"].T @ dW).square().mean(0)
    assert torch.allclose(dec["scale"], s, rtol=1e-9, atol=1e-14)
    eye = torch.eye(6, dtype=DT)
    expected = _dense_ekfac_solve(eye, dec["QG"], s, raw, DAMPING)
    assert rel_err(model[0].weight.grad.T, expected) < 1e-8


# -- two ranks (gloo): the scaling estimate is averaged like the factors -------------------------
def _ekfac_run(model: nn.Module, batches, rank: int = 0, world: int = 1):
    pre = KFACPreconditioner(
        model,
        compute_method="ekfac",
        factor_update_steps=1,
        inv_update_steps=2,
        factor_decay=0.5,
        damping=DAMPING,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        pre.step(opt)
        opt.step()
    return {n: b.decomposition["scale"].clone() for n, b in pre.blocks.items()}


def _batches():
    gen = torch.Generator().manual_seed(9)
    return [
        (torch.randn(8, 4, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(3)
    ]


def _net() -> nn.Module:
    torch.manual_seed(10)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_net())
        torch.save(_ekfac_run(model, _batches(), rank, world), f"{out}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while its peer still talks (SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_ddp_worker, args=(r, 2, str(tmp_path / "store"), str(tmp_path)), daemon=True
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _ekfac_run(_net(), _batches())
    for name, s in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], s, rtol=1e-9, atol=1e-14), name


# -- re-estimation in the new basis with the default decay (George et al. 2018, Algorithm 1) -----
class _SeqNet(nn.Module):
    """Linear on (B, T, d): every position is an example (one loss term per position)."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x))).mean(1)


def _seq_position_grads(model: _SeqNet, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per-position ``dW~_r = g_r a_r^T`` of both layers, with g = (B T) x autograd's gradient.

    Every position r is one term of the loss seen per row, so its gradient is the row's
    ``g_r a_r^T`` (the model's loss is the mean over positions of each example's logits)."""
    with record(model, ["inner", "head"]) as store:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad()
    out = {}
    for name in ("inner", "head"):
        ((inp, outp),) = store[name]
        a, g = linear_rows(getattr(model, name), inp, outp)
        out[name] = g[:, :, None] * a[:, None, :]
    return out


def _conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2),
        nn.Flatten(),
        nn.Linear(2 * 9, 4),
    ).to(DT)


@pytest.mark.parametrize("kind", ["linear", "sequence", "conv"])
def test_scaling_after_refresh_is_the_new_basis_second_moment_with_default_decay(kind) -> None:
    """factor_decay=0.95 (default): after each refresh (t = 0 and t = 3) the scaling is exactly
    E_n[(Q_G^T dW~_n Q_A)^2] over the refresh step's examples in the NEW basis, not K-FAC's
    e_G e_A^T nor a blend; between refreshes it is the running average.

    "Example" follows the factors: Linear on (B, d) one row; Linear on (B, T, d) one position
    (N = B T terms, g = N x autograd's row); conv one image, dW~_n summed over output locations
    (g = B x autograd's gradient)."""
    torch.manual_seed(12)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
        shapes, make_x = {"0": 5, "2": 3}, lambda: torch.randn(9, 4, dtype=DT)
    elif kind == "sequence":
        model = _SeqNet().to(DT)
        shapes, make_x = {"inner": 5, "head": 4}, lambda: torch.randn(3, 4, 3, dtype=DT)
    else:
        model = _conv_net()
        shapes, make_x = {"0": 3, "2": 2, "4": 4}, lambda: torch.randn(5, 2, 4, 4, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    pre = KFACPreconditioner(
        model, compute_method="ekfac", damping=DAMPING, factor_update_steps=1, inv_update_steps=3
    )
    assert pre.config.factor_decay == 0.95
    expected: dict[str, Tensor] = {}
    for t in range(5):
        x = make_x()
        y = torch.randint(0, 3, (x.shape[0],))
        if kind == "sequence":
            per = _seq_position_grads(model, x, y)
        else:
            per = {n: _per_example(model, x, y, n, o) for n, o in shapes.items()}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step(opt)
        for name, dW in per.items():
            block = pre.blocks[name]
            dec = block.decomposition
            s_hat = _rotated_sq_mean(dW, dec["QA"], dec["QG"])
            if t % 3 == 0:
                # the new basis: eigenvectors of the running factors (decay 0.95 since t = 0)
                for Q, e, M in ((dec["QG"], dec["eG"], block.G), (dec["QA"], dec["eA"], block.A)):
                    assert torch.allclose(Q @ torch.diag(e) @ Q.T, M, rtol=1e-8, atol=1e-12)
                expected[name] = s_hat
                kfac = torch.outer(dec["eG"], dec["eA"])
                assert rel_err(dec["scale"], kfac) > 1e-3, (t, name)  # not K-FAC's eigenvalues
            else:
                expected[name] = 0.95 * expected[name] + 0.05 * s_hat
            assert torch.allclose(dec["scale"], expected[name], rtol=1e-9, atol=1e-14), (t, name)
        opt.step()


def test_ekfac_is_closer_to_the_empirical_fisher_than_kfac() -> None:
    """George et al. 2018, sec. 3.2: in the Kronecker eigenbasis Q = Q_A (x) Q_G, the diagonal
    closest (Frobenius) to the empirical Fisher block F = E_n[vec(dW~_n) vec(dW~_n)^T] is
    diag(Q^T F Q) = s, EKFAC's scaling; K-FAC's A (x) G = Q diag(e_G e_A^T) Q^T is another
    diagonal in the same basis, so ||F - F_KFAC||^2 - ||F - F_EKFAC||^2 = ||s - e_G e_A^T||^2.
    Checked on a conv + linear network against the dense block from torch.func, and ||F -
    F_EKFAC||^2 = ||F||^2 - ||s||^2 (Pythagoras in the rotated basis)."""
    torch.manual_seed(13)
    model = _conv_net()
    x, y = torch.randn(16, 2, 4, 4, dtype=DT), torch.randint(0, 4, (16,))
    pre = KFACPreconditioner(model, compute_method="ekfac", damping=DAMPING)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    for name, out in {"0": 3, "2": 2, "4": 4}.items():
        dW = _per_example(model, x, y, name, out)
        vecs = torch.stack([vec(d) for d in dW])
        fisher = vecs.T @ vecs / len(vecs)
        block, dec = pre.blocks[name], pre.blocks[name].decomposition
        Q = torch.kron(dec["QA"].contiguous(), dec["QG"].contiguous())
        ekfac = Q @ torch.diag(vec(dec["scale"])) @ Q.T
        kfac = torch.kron(block.A, block.G)
        err_ekfac = float(torch.linalg.norm(fisher - ekfac))
        err_kfac = float(torch.linalg.norm(fisher - kfac))
        assert err_ekfac < err_kfac, (name, err_ekfac, err_kfac)
        norm2 = float(torch.linalg.norm(fisher)) ** 2
        pythagoras = norm2 - float(dec["scale"].square().sum())
        assert abs(err_ekfac**2 - pythagoras) < 1e-8 * norm2
        # the gain is exactly the distance between the two diagonals
        gain = float((dec["scale"] - torch.outer(dec["eG"], dec["eA"])).square().sum())
        assert abs((err_kfac**2 - err_ekfac**2) - gain) < 1e-8 * norm2
        assert gain > 1e-3 * norm2


def test_aborted_step_restores_the_scaling_count():
    """A step undone with ``abort_step`` (its optimizer step never ran) and run again leaves the
    EKFAC scaling and its estimate count as an uninterrupted run does. Warm-up ends at t=3, off
    the factor clock, so the first estimate in that basis comes at t=4 (count 0 -> 1, in place)."""

    def run(abort_at):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        pre = KFACPreconditioner(
            model,
            compute_method="ekfac",
            factor_update_steps=2,
            inv_update_steps=100,
            warmup_steps=3,
            optimizer=opt,
        )
        pre.undoable = True
        gen = torch.Generator().manual_seed(1)
        for t in range(6):
            x = torch.randn(8, 4, generator=gen)
            for attempt in range(2 if t == abort_at else 1):
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                pre.step(opt)
                if t == abort_at and attempt == 0:
                    assert pre.abort_step(t)
                    continue
                opt.step()
                pre.commit_step()
        return {n: b.decomposition for n, b in pre.blocks.items()}

    plain, aborted = run(None), run(4)
    for name, dec in plain.items():
        assert float(dec.scale_updates) == float(aborted[name].scale_updates) == 1.0
        assert torch.equal(dec.scale, aborted[name].scale), name
