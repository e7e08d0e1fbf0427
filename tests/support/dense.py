"""Dense brute-force references for K-FAC, built independently of ``lightning_kfac``.

Conventions (docs/conventions.md): ``W~ = [W b]`` is out x (in+1) (conv weights are
flattened to out x (C_in * kernel elements), channel-major as in ``F.unfold``); ``vec`` stacks
columns, so ``vec(g a^T) = a (x) g`` and ``vec(M) = M.T.reshape(-1)``. The Fisher block of
``vec(W~)`` is approximated by ``A (x) G = torch.kron(A, G)``.

Nothing here uses the engine: per-example gradients come from ``torch.func`` (vmap of grad over
a ``functional_call``), layer inputs/outputs from plain forward hooks with ``retain_grad``, conv
patches from an explicit loop or ``F.unfold``, solves from ``torch.linalg.solve`` on the dense
Kronecker product. Everything is meant to run in float64.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

# --------------------------------------------------------------------------------------------
# vec / W~ layout


def vec(M: Tensor) -> Tensor:
    """Column-stacking vec of an (out x in) matrix: ``vec(g a^T) = kron(a, g)``."""
    return M.T.reshape(-1)


def unvec(v: Tensor, rows: int) -> Tensor:
    """Inverse of :func:`vec` for a matrix with ``rows`` rows."""
    return v.reshape(-1, rows).T


def weight_matrix(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``W~ = [W b]`` with W flattened to (out, -1); no bias column without bias."""
    W = weight.reshape(weight.shape[0], -1)
    return W if bias is None else torch.cat([W, bias.reshape(-1, 1)], dim=1)


def grad_matrix(module: nn.Module) -> Tensor:
    """``grad W~`` of a Linear/Conv module, from its ``.grad`` fields (a fresh tensor)."""
    bias = module.bias.grad if module.bias is not None else None
    return weight_matrix(module.weight.grad, bias).detach().clone()


def rel_err(x: Tensor, ref: Tensor) -> float:
    """``||x - ref|| / ||ref||`` (Frobenius), as a Python float."""
    x, ref = x.detach(), ref.detach()
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


# --------------------------------------------------------------------------------------------
# per-example gradients and the exact Fisher block (torch.func)


def per_example_grads(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, layer: str
) -> Tensor:
    """``vec(dW~_n)`` for every example n of the batch, shape (B, out * (in [+1])).

    ``l_n = loss_fn(model(x_n[None]), y_n[None])`` is one example's loss term, differentiated
    with ``vmap(grad(...))`` over ``functional_call``; the weight gradient is flattened to
    (out, -1), the bias gradient appended as the last column, then vec'd column by column.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    dW = grads[f"{layer}.weight"]
    B, out = dW.shape[0], dW.shape[1]
    dW = dW.reshape(B, out, -1)
    if f"{layer}.bias" in grads:
        dW = torch.cat([dW, grads[f"{layer}.bias"].reshape(B, out, 1)], dim=2)
    return dW.transpose(1, 2).reshape(B, -1)


def exact_fisher_block(per_example: Tensor) -> Tensor:
    """``E_n[vec(dW~_n) vec(dW~_n)^T]`` from the rows returned by :func:`per_example_grads`."""
    return per_example.T @ per_example / per_example.shape[0]


# --------------------------------------------------------------------------------------------
# recording layer inputs and outputs


@contextlib.contextmanager
def record(
    model: nn.Module, names: Sequence[str]
) -> Iterator[dict[str, list[tuple[Tensor, Tensor]]]]:
    """Record ``(input, output)`` of the named modules in every forward; outputs retain grad.

    After ``backward()``, ``output.grad`` holds autograd's gradient of the loss with respect to
    the layer output. The hooks are removed on exit.
    """
    modules = dict(model.named_modules())
    store: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in names}
    handles = []
    for name in names:

        def hook(
            mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, name: str = name
        ) -> None:
            output.retain_grad()
            store[name].append((inputs[0].detach(), output))

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# brute-force factors by the definitions of docs/conventions.md


def _append_one(a: Tensor, bias: bool) -> Tensor:
    return torch.cat([a, torch.ones_like(a[:, :1])], dim=1) if bias else a


def linear_rows(
    module: nn.Linear, inp: Tensor, out: Tensor, reduction: str = "mean", rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row ``a_n`` (trailing 1 with bias) and ``g_n`` (N x autograd grad for "mean").

    Every leading dimension counts as an example (KFAC-expand). ``rows`` is the N of the mean
    (defaults to the number of rows of this call).
    """
    a = _append_one(inp.reshape(-1, inp.shape[-1]), module.bias is not None)
    g = out.grad.reshape(-1, out.shape[-1])
    n = a.shape[0] if rows is None else rows
    scale = float(n) if reduction == "mean" else 1.0
    return a, g * scale


def linear_factors(
    module: nn.Linear, calls: Sequence[tuple[Tensor, Tensor]], reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """``A^ = (1/N) sum a a^T``, ``G^ = (1/N) sum g g^T`` over all rows of all recorded calls."""
    N = sum(inp.reshape(-1, inp.shape[-1]).shape[0] for inp, _ in calls)
    A = G = 0
    for inp, out in calls:
        a, g = linear_rows(module, inp, out, reduction, rows=N)
        A = A + a.T @ a
        G = G + g.T @ g
    return A / N, G / N


def conv_patches_loop(module: nn.Module, x: Tensor) -> Tensor:
    """Patches ``a_{n,t}`` by an explicit loop over output locations: (B, T, C_in * prod(k)).

    Works for Conv1d and Conv2d (groups=1, zero padding); location t runs row-major over the
    output grid, matching ``output.reshape(B, C_out, T)``; patch entries are channel-major.
    """
    d = x.dim() - 2
    k, s, p, dil = (
        tuple(module.kernel_size),
        tuple(module.stride),
        tuple(module.padding),
        tuple(module.dilation),
    )
    pad = []
    for i in reversed(range(d)):
        pad += [p[i], p[i]]
    xp = F.pad(x, pad)
    out_sizes = [
        (x.shape[2 + i] + 2 * p[i] - dil[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(d)
    ]
    patches = []
    for loc in torch.cartesian_prod(*[torch.arange(o) for o in out_sizes]).reshape(-1, d).tolist():
        idx = [torch.arange(k[i]) * dil[i] + loc[i] * s[i] for i in range(d)]
        if d == 1:
            patch = xp[:, :, idx[0]]
        else:
            patch = xp[:, :, idx[0]][:, :, :, idx[1]]
        patches.append(patch.reshape(x.shape[0], -1))
    return torch.stack(patches, dim=1)


def conv2d_patches_unfold(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Patches of a Conv2d by ``F.unfold``: (B, T, C_in * kh * kw)."""
    cols = F.unfold(
        x,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,
        stride=module.stride,
    )
    return cols.transpose(1, 2)


def conv_rows(
    module: nn.Module, inp: Tensor, out: Tensor, reduction: str = "mean", batch: int | None = None
) -> tuple[Tensor, Tensor]:
    """``a_{n,t}`` (B, T, d_in [+1]) and ``g_{n,t}`` (B, T, C_out), g = B x
    autograd grad for mean."""
    a = conv_patches_loop(module, inp)
    B, T = a.shape[0], a.shape[1]
    if module.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    g = out.grad.reshape(B, out.shape[1], T).transpose(1, 2)
    scale = float(B if batch is None else batch) if reduction == "mean" else 1.0
    return a, g * scale


def conv_factors(
    module: nn.Module, calls: Sequence[tuple[Tensor, Tensor]], reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """KFC factors: ``A = (1/B) sum_n sum_t a a^T``, ``G = (1/(B T)) sum_n sum_t g g^T``."""
    B = sum(inp.shape[0] for inp, _ in calls)
    A = G = 0
    T = None
    for inp, out in calls:
        a, g = conv_rows(module, inp, out, reduction, batch=B)
        T = a.shape[1]
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        A = A + a2.T @ a2
        G = G + g2.T @ g2
    return A / B, G / (B * T)


def brute_factors(
    model: nn.Module, store: Mapping[str, Sequence[tuple[Tensor, Tensor]]], reduction: str = "mean"
) -> dict[str, tuple[Tensor, Tensor]]:
    """Brute-force ``(A^, G^)`` for every recorded Linear/Conv module, after ``backward()``."""
    modules = dict(model.named_modules())
    out = {}
    for name, calls in store.items():
        mod = modules[name]
        if isinstance(mod, nn.Linear):
            out[name] = linear_factors(mod, calls, reduction)
        else:
            out[name] = conv_factors(mod, calls, reduction)
    return out


# --------------------------------------------------------------------------------------------
# preconditioning formulas


def eigen_precondition(A: Tensor, G: Tensor, grad_wt: Tensor, damping: float) -> Tensor:
    """Dense exact damping: ``vec(P) = (kron(A, G) + damping I)^-1 vec(grad W~)``."""
    M = torch.kron(A, G)
    M = M + damping * torch.eye(M.shape[0], dtype=M.dtype)
    return unvec(torch.linalg.solve(M, vec(grad_wt)), grad_wt.shape[0])


def factored_pi(A: Tensor, G: Tensor) -> float:
    """``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015, sec. 6.3)."""
    return math.sqrt(float((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])))


def inverse_precondition(A: Tensor, G: Tensor, grad_wt: Tensor, damping: float) -> Tensor:
    """Factored Tikhonov: ``P = (G + sqrt(d)/pi I)^-1 grad W~ (A + pi sqrt(d) I)^-1``."""
    pi = factored_pi(A, G)
    r = math.sqrt(damping)
    Gd = G + (r / pi) * torch.eye(G.shape[0], dtype=G.dtype)
    Ad = A + (pi * r) * torch.eye(A.shape[0], dtype=A.dtype)
    left = torch.linalg.solve(Gd, grad_wt)
    return torch.linalg.solve(Ad.T, left.T).T


def kl_clip_factor(pairs: Sequence[tuple[Tensor, Tensor, float]], kl_clip: float) -> float:
    """``nu = min(1, sqrt(c / |sum_l lr_l^2 sum(P_l * grad_l)|))`` over (P, grad W~, lr) triples."""
    total = sum(lr**2 * float((P * g).sum()) for P, g, lr in pairs)
    return min(1.0, math.sqrt(kl_clip / abs(total)))
