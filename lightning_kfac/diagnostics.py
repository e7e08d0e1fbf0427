"""Diagnostics: how good is the Kronecker approximation, and how far is ``E[g]`` from zero.

Martens & Grosse 2015, sec. 3 (and docs/conventions.md): for one layer with per-example
gradient ``J_n = g_n a_n^T`` the exact Fisher block of ``vec(W~)`` is

    M = E_n[vec(J_n) vec(J_n)^T] = E_n[(a_n a_n^T) (x) (g_n g_n^T)],

and K-FAC replaces it by ``K = A (x) G`` with ``A = E[a a^T]``, ``G = E[g g^T]``. The entrywise
error ``E[a1 a2 g1 g2] - E[a1 a2] E[g1 g2]`` is a sum of third- and fourth-order cumulants
(``kappa(a1,a2,g1,g2) + kappa(a1) kappa(a2,g1,g2) + kappa(a2) kappa(a1,g1,g2)``), which vanish
when ``a`` and ``g`` are independent and ``E[g] = 0``. We report the relative Frobenius error
``||M - K||_F / ||M||_F`` per layer, and the mean gradient ``E[g]`` (zero in expectation under
the true Fisher, i.e. labels sampled from the model; not under the empirical Fisher).

Conventions are those of docs/conventions.md and the engine (``lightning_kfac.core.layers``): ``a``
has a trailing 1 when the layer has a bias; with a mean-reduced loss ``g_n = N x`` autograd's
gradient (N = rows for Linear, B for conv); conv layers follow KFC: example n owns T rows
``(a_{n,t}, g_{n,t})``, ``J_n = sum_t g_{n,t} a_{n,t}^T``, ``A = (1/B) sum a a^T``,
``G = (1/(BT)) sum g g^T``.

Three ways to get the error, chosen by ``method`` ("auto" picks the cheapest exact one that fits):

- ``"dense"``: form ``M`` and ``torch.kron(A, G)`` and subtract (exact; (d_in d_out)^2 memory).
- ``"gram"``: exact at cost O(B^2 (d_in + d_out)) without forming the block, from
  ``||M||^2 = E_{n,m}[<J_n, J_m>^2]`` (for Linear ``<J_n, J_m> = (a_n^T a_m)(g_n^T g_m)``),
  ``<K, M> = E_n[<J_n, G J_n A>] = E_n[(a_n^T A a_n)(g_n^T G g_n)]`` and
  ``||K||^2 = ||A||^2 ||G||^2``. The subtraction ``||M||^2 - 2<K,M> + ||K||^2`` cancels, so the
  relative error is only resolved down to about sqrt(machine eps) (~1e-8 in float64).
- ``"probe"``: unbiased estimates of ``||M - K||^2`` and ``||M||^2`` as ``E_v ||X v||^2`` over
  standard normal ``v = vec(V)``, with ``M vec(V) = E_n[<J_n, V> vec(J_n)]`` (for Linear
  ``<J_n, V> = g_n^T V a_n``) and ``K vec(V) = vec(G V A)``: O(k B T d_in d_out) for k probes,
  never forming the block. ``std`` is the delta-method standard error of the ratio.

All three measure the batch's own (plug-in) block. That figure is biased upward when the batch
is small against the layer: the batch ``M`` has rank <= B while ``A (x) G`` has rank up to
B^2, so with B << d_in d_out it tends to 1 whatever the network (e.g. 0.90, 0.82, 0.52, 0.23 at
B = 16, 128, 1024, 8192 for a 50-40 tanh layer on Gaussian inputs). For one row per example
(Linear) and B >= 4 we also report ``population``: the ratio of unbiased U-statistic estimates
of the population's ``||M - A (x) G||^2`` and ``||M||^2`` (the error measure of the Kronecker
approximation). With ``P_nm = (a_n . a_m)^2`` and ``Q_nm = (g_n . g_m)^2`` over distinct examples,
``||M||^2 = E[P_nm Q_nm]``, ``<K, M> = E[P_nm Q_nk]``, ``||K||^2 = E[P_nm Q_kl]`` (indices all
distinct), summed over distinct index tuples by inclusion-exclusion at O(B^2 (d_in + d_out)).

Example:
    >>> import torch.nn.functional as F
    >>> stats = diagnose(model, x, lambda out: F.cross_entropy(out, y))
    >>> stats["fc1"]["kronecker_error"], stats["fc1"]["mean_grad_norm"]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import (
    Any,
    Protocol,
    cast,
)

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.capture import install_tap, output_grad_scale
from lightning_kfac.core.layers import make_kind
from lightning_kfac.core.parametrized import parametrization_reason

__all__ = [
    "KroneckerError",
    "LayerRows",
    "diagnose",
    "kronecker_error",
    "mean_gradient",
    "population_terms",
    "record_rows",
    "sampled_nll",
    "to_scalars",
]

_METHODS = ("auto", "dense", "gram", "probe")
_DENSE_MAX_PARAMS = 1024  # "auto": form the dense block when d_in * d_out <= this
_GRAM_MAX_FLOPS = 4e9  # "auto": exact (dense or Gram) when it costs at most this many flops
_PROBE_CHUNK_ELEMENTS = 1 << 24  # bound on the temporaries of one chunk of probes


class CapturingLayers(Protocol):
    """What the diagnostics need of a preconditioner (``KFACPreconditioner`` is one): its
    blocks, whose ``capturing`` switch is turned off during the diagnostic pass."""

    @property
    def layers(self) -> Mapping[str, KFACBlock]: ...


@dataclass
class LayerRows:
    """Per-row layer inputs and output gradients of one layer for one batch.

    Attributes:
        a: (R, d_in) input rows, trailing 1 for a bias (conv: unfolded patches).
        g: (R, d_out) per-example output gradients (``N x`` autograd's for a mean loss).
        num_examples: B; the rows of example n are ``n*T ... n*T + T - 1`` with ``T = R / B``
            (T = 1 for Linear, the number of output locations for conv).
    """

    a: Tensor
    g: Tensor
    num_examples: int

    @property
    def rows_per_example(self) -> int:
        return self.a.shape[0] // self.num_examples


@dataclass
class KroneckerError:
    """Result of :func:`kronecker_error`: ``relative = error_norm / block_norm``.

    ``error_norm`` = ``||M - A (x) G||_F``, ``block_norm`` = ``||M||_F`` (estimates for the probe
    method), ``std`` the standard error of ``relative`` (0 for the exact methods), ``method`` the
    method used and ``probes`` the number of probes (0 when exact). ``population`` is the
    unbiased estimate of the population's relative error (None for conv rows, B < 4, or when
    the B x B Gram matrices would be too costly); see the module docstring.
    """

    relative: float
    error_norm: float
    block_norm: float
    std: float
    method: str
    probes: int
    population: float | None = None


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        choices = ", ".join(map(repr, allowed))
        raise ValueError(f"Invalid {name}={value!r}: must be one of {choices}.")
    return str(value)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}={value!r}: must be an integer >= 1.")
    return value


def _covered_modules(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    if layers is not None:
        names = list(layers)
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ValueError(f"Invalid layers={names!r}: no modules named {unknown} in the model.")
    else:
        names = list(modules)
    out = {}
    for name in names:
        module = modules[name]
        kind, _ = make_kind(module)
        if kind is not None and parametrization_reason(module):
            kind = None  # never evaluate a parametrization (core/parametrized.py)
        plain = (
            kind is not None
            and kind.groups == 1
            and (  # one 2-D W~, unmasked rows
                getattr(module, "padding_idx", None) is None or not kind.diagonal_a
            )
        )
        if plain and kind is not None and kind.weight.requires_grad:
            out[name] = module
    if layers is not None and len(out) != len(names):
        bad = [n for n in names if n not in out]
        raise ValueError(f"Invalid layers={names!r}: {bad} are not trainable Linear/Conv layers.")
    return out


def record_rows(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    *,
    layers: Iterable[str] | None = None,
    loss_reduction: str = "mean",
    dtype: torch.dtype = torch.float64,
    preconditioner: CapturingLayers | None = None,
) -> dict[str, LayerRows]:
    """Per-example ``a`` and ``g`` rows of every Linear/Conv layer for one batch.

    Runs ``loss = loss_fn(model(inputs))`` (``model(*inputs)`` for a tuple/list) with forward
    hooks and output tensor hooks, then ``torch.autograd.grad(loss, weights)``: parameters'
    ``.grad`` fields are left untouched, so this is safe in the middle of training. The model's
    train/eval mode is used as is.

    Args:
        model: any ``nn.Module``.
        inputs: the batch inputs.
        loss_fn: maps the model output to the scalar loss (bind targets with a closure).
        layers: qualified module names to record; None records every trainable Linear/Conv.
        loss_reduction: "mean" (``g_n = N x grad``, docs/conventions.md) or "sum" (``g_n = grad``).
        dtype: dtype of the returned rows (float64 by default, for exact error figures).
        preconditioner: the ``KFACPreconditioner`` attached to ``model``, if any: its capture is
            paused during this extra forward/backward. Without it, a capturing preconditioner
            would add the diagnostic batch to its factor accumulators.

    Returns:
        name -> :class:`LayerRows`. A module called several times contributes all its calls'
        rows (examples = sum over calls); a module whose forward never ran is absent.
    """
    _check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
    covered = _covered_modules(model, layers)
    recorders = {
        name: _RowRecorder(make_kind(module)[0], dtype) for name, module in covered.items()
    }
    handles = [
        install_tap(covered[name], recorder.kind, recorder) for name, recorder in recorders.items()
    ]
    paused = []
    if preconditioner is not None:
        for block in preconditioner.layers.values():
            paused.append((block, block.capturing))
            block.capturing = False
    try:
        with torch.enable_grad():
            output = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
            loss = loss_fn(output)
            if not (isinstance(loss, Tensor) and loss.dim() == 0):
                raise ValueError(f"Invalid loss_fn: must return a scalar tensor, got {loss!r}.")
            weights = [cast(Tensor, m.weight) for n, m in covered.items() if recorders[n].a]
            if weights:
                torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for block, capturing in paused:
            block.capturing = capturing

    result = {}
    for name, recorder in recorders.items():
        if not recorder.a or not recorder.g:
            continue
        slots = sorted(recorder.g)
        examples = sum(recorder.g[s][1] for s in slots)
        # per call, as the engine: a mean loss over N examples gives each call's rows grad / N
        mean = loss_reduction == "mean"
        a = torch.cat([recorder.a[s] for s in slots])
        g = torch.cat(
            [
                g_rows * output_grad_scale(n, mean_reduction=mean)
                for g_rows, n in (recorder.g[s] for s in slots)
            ]
        )
        result[name] = LayerRows(a=a, g=g, num_examples=examples)
    return result


class _RowRecorder:
    """A capture tap (core/capture.py) keeping every forward's raw rows of one layer: ``a`` by
    call, and ``(g rows, examples)`` by the call whose output gradient arrived."""

    def __init__(self, kind: Any, dtype: torch.dtype):
        self.kind = kind
        self.dtype = dtype
        self.a: list[Tensor] = []
        self.g: dict[int, tuple[Tensor, int]] = {}

    def wants(self, module: nn.Module) -> bool:
        return True  # the model's train/eval mode is used as is

    def on_forward(
        self, x: Tensor, rows: Tensor, divisor: int, output: Tensor
    ) -> Callable[[Tensor], None]:
        self.a.append(rows.to(self.dtype))
        slot = len(self.a) - 1

        def grad_hook(grad: Tensor) -> None:
            g_rows, _, examples = self.kind.grad_rows(grad.detach())
            self.g[slot] = (g_rows.to(self.dtype), examples)

        return grad_hook


def _factors(a: Tensor, g: Tensor, B: int) -> tuple[Tensor, Tensor]:
    return a.T @ a / B, g.T @ g / g.shape[0]


def _per_example_grads(a: Tensor, g: Tensor, B: int) -> Tensor:
    """``J_n = sum_t g_{n,t} a_{n,t}^T``, shape (B, d_out, d_in)."""
    T = a.shape[0] // B
    return torch.einsum("bto,bti->boi", g.reshape(B, T, -1), a.reshape(B, T, -1))


def _dense(a: Tensor, g: Tensor, B: int) -> tuple[float, float]:
    A, G = _factors(a, g, B)
    J = _per_example_grads(a, g, B)
    vecJ = J.transpose(1, 2).reshape(B, -1)  # column-stacking vec: vec(g a^T) = a (x) g
    M = vecJ.T @ vecJ / B
    return float(torch.linalg.norm(M - torch.kron(A, G))), float(torch.linalg.norm(M))


def _gram(a: Tensor, g: Tensor, B: int) -> tuple[float, float]:
    A, G = _factors(a, g, B)
    if a.shape[0] == B:  # one row per example: <J_n, J_m> = (a_n.a_m)(g_n.g_m)
        C = (a @ a.T) * (g @ g.T)
        cross = ((a @ A) * a).sum(1) * ((g @ G) * g).sum(1)
    else:
        J = _per_example_grads(a, g, B)
        flat = J.reshape(B, -1)
        C = flat @ flat.T
        cross = (torch.matmul(torch.matmul(G, J), A) * J).sum((1, 2))
    m2 = float((C * C).sum()) / B**2
    k2 = float((A * A).sum()) * float((G * G).sum())
    e2 = max(m2 - 2.0 * float(cross.mean()) + k2, 0.0)
    return math.sqrt(e2), math.sqrt(m2)


def _probe(
    a: Tensor, g: Tensor, B: int, num_probes: int, generator: torch.Generator
) -> tuple[float, float, float]:
    A, G = _factors(a, g, B)
    R, d_in, d_out = a.shape[0], a.shape[1], g.shape[1]
    T = R // B
    chunk = max(1, _PROBE_CHUNK_ELEMENTS // (R * max(d_in, d_out) + d_in * d_out))
    err_parts: list[Tensor] = []
    blk_parts: list[Tensor] = []
    for start in range(0, num_probes, chunk):
        k = min(chunk, num_probes - start)
        V = torch.randn(k, d_out, d_in, dtype=a.dtype, generator=generator).to(a.device)
        s = (torch.matmul(g, V) * a).sum(-1)  # (k, R): g_r^T V a_r
        s = s.reshape(k, B, T).sum(-1).repeat_interleave(T, dim=1)  # <J_n, V> on each row of n
        Mv = torch.matmul((g * s.unsqueeze(-1)).transpose(1, 2), a) / B  # E_n[<J_n,V> J_n]
        Kv = torch.matmul(torch.matmul(G, V), A)
        err_parts.append(((Mv - Kv) ** 2).sum((1, 2)))
        blk_parts.append((Mv**2).sum((1, 2)))
    y_err, y_blk = torch.cat(err_parts), torch.cat(blk_parts)
    e2, m2 = float(y_err.mean()), float(y_blk.mean())
    ratio = e2 / m2 if m2 > 0 else 0.0
    rel = math.sqrt(max(ratio, 0.0))
    if num_probes > 1 and m2 > 0 and rel > 0:
        # delta method: Var(e2/m2) ~ Var(y_err - ratio y_blk) / (k m2^2); d sqrt(r) = dr / 2 sqrt(r)
        var_ratio = float((y_err - ratio * y_blk).var()) / (num_probes * m2**2)
        std = math.sqrt(var_ratio) / (2.0 * rel)
    else:
        std = 0.0
    return math.sqrt(max(e2, 0.0)), math.sqrt(max(m2, 0.0)), std


def population_terms(a: Tensor, g: Tensor) -> tuple[float, float]:
    """Unbiased estimates ``(||M - K||^2, ||M||^2)`` of the population block, one row per example.

    U-statistics over distinct examples (B >= 4): with ``P = (a a^T)^2``, ``Q = (g g^T)^2``
    (entrywise, diagonals zeroed), ``rp = P 1``, ``rq = Q 1``, ``T = sum P * Q``:
    ``m2 = T / B(B-1)``, ``cross = (rp . rq - T) / B(B-1)(B-2)`` and
    ``k2 = (sum P sum Q - 4 rp . rq + 2 T) / B(B-1)(B-2)(B-3)`` (inclusion-exclusion of the
    coinciding indices); ``||M - K||^2 = m2 - 2 cross + k2``.
    """
    B = a.shape[0]
    if B < 4:
        raise ValueError(f"Invalid rows: the unbiased estimate needs >= 4 examples, got {B}.")
    P = (a @ a.T) ** 2
    Q = (g @ g.T) ** 2
    P.fill_diagonal_(0.0)
    Q.fill_diagonal_(0.0)
    rp, rq = P.sum(1), Q.sum(1)
    t2 = float((P * Q).sum())
    rr = float((rp * rq).sum())
    m2 = t2 / (B * (B - 1))
    cross = (rr - t2) / (B * (B - 1) * (B - 2))
    k2 = (float(P.sum()) * float(Q.sum()) - 4.0 * rr + 2.0 * t2) / (B * (B - 1) * (B - 2) * (B - 3))
    return m2 - 2.0 * cross + k2, m2


def kronecker_error(
    a: Tensor,
    g: Tensor,
    num_examples: int | None = None,
    *,
    method: str = "auto",
    num_probes: int = 64,
    generator: torch.Generator | None = None,
) -> KroneckerError:
    """Relative Frobenius error ``||M - A (x) G|| / ||M||`` of one layer's Kronecker factors.

    Args:
        a: (R, d_in) input rows (see :class:`LayerRows`).
        g: (R, d_out) per-example output-gradient rows.
        num_examples: B, with ``T = R / B`` consecutive rows per example; None means R (Linear).
        method: "auto", "dense", "gram" or "probe" (see the module docstring).
        num_probes: Gaussian probes for ``method="probe"`` (standard error ~ 1/sqrt(num_probes)).
        generator: random source for the probes (a fixed-seed one by default).
    """
    _check_choice("method", method, _METHODS)
    _check_positive_int("num_probes", num_probes)
    if a.dim() != 2 or g.dim() != 2 or a.shape[0] != g.shape[0] or a.shape[0] == 0:
        raise ValueError(
            f"Invalid rows: a {tuple(a.shape)} and g {tuple(g.shape)} must be 2-D "
            "with the same, nonzero number of rows."
        )
    R = a.shape[0]
    B = R if num_examples is None else num_examples
    if isinstance(B, bool) or not isinstance(B, int) or B < 1 or R % B:
        raise ValueError(
            f"Invalid num_examples={num_examples!r}: must be a positive divisor of "
            f"the number of rows ({R})."
        )
    if g.dtype != a.dtype:
        g = g.to(a.dtype)
    d_in, d_out = a.shape[1], g.shape[1]
    if method == "auto":
        per_example = R == B
        gram_flops = (
            B * B * (d_in + d_out)
            if per_example
            else B * B * d_in * d_out + 2 * B * d_in * d_out * (d_in + d_out)
        )
        if d_in * d_out <= _DENSE_MAX_PARAMS and B * (d_in * d_out) ** 2 <= _GRAM_MAX_FLOPS:
            method = "dense"
        elif gram_flops <= _GRAM_MAX_FLOPS:
            method = "gram"
        else:
            method = "probe"
    if method == "dense":
        err, blk = _dense(a, g, B)
        std, probes = 0.0, 0
    elif method == "gram":
        err, blk = _gram(a, g, B)
        std, probes = 0.0, 0
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        err, blk, std = _probe(a, g, B, num_probes, generator)
        probes = num_probes
    rel = err / blk if blk > 0 else 0.0
    population = None
    if R == B and B >= 4 and B * B * (d_in + d_out) <= _GRAM_MAX_FLOPS:
        e2_pop, m2_pop = population_terms(a, g)
        population = math.sqrt(max(e2_pop, 0.0) / m2_pop) if m2_pop > 0 else 0.0
    return KroneckerError(
        relative=rel,
        error_norm=err,
        block_norm=blk,
        std=std,
        method=method,
        probes=probes,
        population=population,
    )


def mean_gradient(rows: LayerRows) -> Tensor:
    """``E[g]`` over all rows, shape (d_out,).

    Under the true Fisher (labels drawn from the model) ``E_y[g] = E_y[grad_s log p(y|s)] = 0``;
    under the empirical Fisher it is the bias gradient times rows per example, so
    it measures how far the empirical Fisher's ``G`` is from a covariance.
    """
    return rows.g.mean(0)


def diagnose(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    *,
    layers: Iterable[str] | None = None,
    loss_reduction: str = "mean",
    method: str = "auto",
    num_probes: int = 64,
    seed: int = 0,
    preconditioner: CapturingLayers | None = None,
) -> dict[str, dict[str, float]]:
    """Per-layer diagnostics for one batch (see :func:`record_rows` for the arguments; from a
    training loop pass ``layers=list(pre.layers)`` and ``preconditioner=pre``).

    Returns name -> dict of floats:
        ``kronecker_error``: ``||M - A (x) G||_F / ||M||_F`` of the batch; ``kronecker_error_std``:
        its standard error (0 when exact); ``probes``: probes used (0 when exact);
        ``kronecker_error_population`` (Linear layers, B >= 4): the unbiased estimate of the
        population's relative error, free of the small-batch bias (module docstring);
        ``mean_grad_norm``: ``||E[g]||``; ``mean_grad_ratio``: ``||E[g]|| / sqrt(E||g||^2)`` in
        [0, 1] (scale-free); ``num_examples``: B; ``rows``: R.

    Example (the true-Fisher view, labels sampled from the model):
        >>> diagnose(model, x, sampled_nll("categorical"))
    """
    _check_choice("method", method, _METHODS)
    rows = record_rows(
        model,
        inputs,
        loss_fn,
        layers=layers,
        loss_reduction=loss_reduction,
        preconditioner=preconditioner,
    )
    return layer_statistics(rows, method=method, num_probes=num_probes, seed=seed)


def layer_statistics(
    rows: dict[str, LayerRows], *, method: str = "auto", num_probes: int = 64, seed: int = 0
) -> dict[str, dict[str, float]]:
    """The per-layer dict of :func:`diagnose` for rows recorded elsewhere (e.g. by the callback
    during a training step). One probe generator (``seed``) serves the layers in order."""
    _check_choice("method", method, _METHODS)
    generator = torch.Generator().manual_seed(int(seed))
    out: dict[str, dict[str, float]] = {}
    for name, r in rows.items():
        err = kronecker_error(
            r.a, r.g, r.num_examples, method=method, num_probes=num_probes, generator=generator
        )
        mean_g = mean_gradient(r)
        rms = float(r.g.pow(2).sum(1).mean().sqrt())
        norm = float(torch.linalg.norm(mean_g))
        out[name] = {
            "kronecker_error": err.relative,
            "kronecker_error_std": err.std,
            "probes": float(err.probes),
            "mean_grad_norm": norm,
            "mean_grad_ratio": norm / rms if rms > 0 else 0.0,
            "num_examples": float(r.num_examples),
            "rows": float(r.a.shape[0]),
        }
        if err.population is not None:
            out[name]["kronecker_error_population"] = err.population
    return out


def sampled_nll(
    likelihood: str = "categorical",
    *,
    variance: float = 1.0,
    generator: torch.Generator | None = None,
) -> Callable[[Tensor], Tensor]:
    """A ``loss_fn`` for the true Fisher: the mean NLL of labels sampled from the model output.

    "categorical": logits over the last dimension; "bernoulli": logits, summed over features;
    "gaussian": the output is the mean of ``N(mean, variance I)``, summed over features.
    The loss is a mean over the leading (batch) dimension, so ``g`` follows docs/conventions.md.
    """
    _check_choice("likelihood", likelihood, ("categorical", "bernoulli", "gaussian"))
    if not (isinstance(variance, (int, float)) and variance > 0 and math.isfinite(variance)):
        raise ValueError(f"Invalid variance={variance!r}: must be a finite number > 0.")

    def loss_fn(output: Tensor) -> Tensor:
        with torch.no_grad():
            if likelihood == "categorical":
                probs = torch.softmax(output.detach().reshape(-1, output.shape[-1]), -1)
                y = torch.multinomial(probs, 1, generator=generator).reshape(output.shape[:-1])
            elif likelihood == "bernoulli":
                y = torch.bernoulli(torch.sigmoid(output.detach()), generator=generator)
            else:
                noise = torch.randn(output.shape, generator=generator, dtype=output.dtype)
                y = output.detach() + math.sqrt(variance) * noise.to(output.device)
        batch = output.shape[0]
        if likelihood == "categorical":
            return F.cross_entropy(output.reshape(-1, output.shape[-1]), y.reshape(-1))
        if likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(output, y, reduction="sum") / batch
        return 0.5 * ((output - y) ** 2).sum() / (variance * batch)

    return loss_fn


def to_scalars(result: dict[str, dict[str, float]], prefix: str = "kfac_diag") -> dict[str, float]:
    """Flatten :func:`diagnose`'s output to ``{"<prefix>/<layer>/<stat>": value}`` for loggers."""
    return {
        f"{prefix}/{layer}/{key}": value
        for layer, stats in result.items()
        for key, value in stats.items()
    }
