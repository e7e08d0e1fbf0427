"""The exact quadratic model of a step and its minimiser over two directions (M&G 2015, sec. 7).

For a step ``delta`` of the parameters, the model of the change of the objective is

    M(delta) = 1/2 delta^T (C + D) delta + grad^T delta,

with ``C = J^T H J`` the generalized Gauss-Newton matrix of the batch (``J`` the Jacobian of the
model output with respect to the parameters, ``H`` the Hessian of the user's loss with respect to
that output; for a loss that is the negative log-likelihood of a categorical, Bernoulli or
Gaussian output, ``C`` is the exact Fisher of the batch), and ``D`` a diagonal of
``lambda + eta`` (the damping and the L2 coefficient of each parameter). Restricted to
``delta = alpha Delta + mu delta_0`` (the K-FAC direction and the previous update) it becomes

    M(alpha, mu) = 1/2 x^T K x + b^T x,   x = [alpha, mu],
    K_ij = v_i^T (C + D) v_j,  b_i = grad^T v_i,  (v_1, v_2) = (Delta, delta_0),

minimised by ``x* = -K^-1 b`` with ``M(x*) = 1/2 b^T x*`` (:func:`solve_step`).

The products are exact, never the Kronecker approximation:

- ``u_i = J v_i`` by forward-mode differentiation of a re-run of the loss (``torch.autograd.
  forward_ad`` dual parameters through ``torch.func.functional_call``), which also returns the
  loss and the output ``f``;
- ``u_i^T H u_j`` as the second derivatives at ``t = 0`` of ``L(f + t_1 u_1 + t_2 u_2)``, the
  user's own loss with the model output replaced by that line (the output module's ``forward`` is
  shadowed for one call, so only the loss after it runs; parameters are detached there).

So ``H`` is the Hessian of whatever loss the user computes from the output (summed or averaged
over features, label smoothing, ...): no likelihood or scale is assumed. The loss must depend on
the parameters only through that one output (an extra term such as an L2 penalty in the loss is
not part of ``C``; give it as the optimizer's ``weight_decay`` instead, which enters as ``eta``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call

#: A 2 x 2 model whose determinant is below this share of ``K_11 K_22`` is solved on Delta alone
#: (the two directions are parallel to working precision; the minimum over their span is the same).
PARALLEL_TOLERANCE = 1e-10


@dataclass
class StepSolution:
    """The minimiser of the two-direction model: ``delta = alpha Delta + mu delta_0``.

    ``model_change`` is ``M(delta)`` (damping included); ``ok`` is False when ``K`` is not
    positive definite or not finite (then alpha = mu = 0 and ``reason`` says why).
    """

    alpha: float
    mu: float
    model_change: float
    ok: bool = True
    reason: str = ""


def solve_step(K: Tensor, b: Tensor) -> StepSolution:
    """Minimise ``1/2 x^T K x + b^T x`` over ``x = [alpha]`` (1 x 1) or ``[alpha, mu]`` (2 x 2).

    ``K`` must be symmetric positive definite; the solve is the closed-form 2 x 2 inverse in
    float64. When the two directions are (numerically) parallel or ``delta_0 = 0``
    (``K_22 = 0``) the 1-D solution ``alpha = -b_1 / K_11, mu = 0`` is returned.
    """
    K = K.detach().double().cpu()
    b = b.detach().double().cpu()
    if not (torch.isfinite(K).all() and torch.isfinite(b).all()):
        return StepSolution(0.0, 0.0, 0.0, ok=False, reason="non-finite quadratic model")
    k11, b1 = float(K[0, 0]), float(b[0])
    if not k11 > 0.0:
        return StepSolution(
            0.0, 0.0, 0.0, ok=False, reason=f"curvature along Delta is not positive ({k11:.3g})"
        )
    if K.shape[0] == 2:
        k12, k22, b2 = float(K[0, 1]), float(K[1, 1]), float(b[1])
        det = k11 * k22 - k12 * k12
        if k22 > 0.0 and det > PARALLEL_TOLERANCE * k11 * k22:
            alpha = -(k22 * b1 - k12 * b2) / det
            mu = -(k11 * b2 - k12 * b1) / det
            return StepSolution(alpha, mu, 0.5 * (alpha * b1 + mu * b2))
        if k22 < 0.0 or det < -PARALLEL_TOLERANCE * k11 * max(k22, 0.0):
            return StepSolution(
                0.0, 0.0, 0.0, ok=False, reason=f"the 2 x 2 model is indefinite (K = {K.tolist()})"
            )
    alpha = -b1 / k11
    return StepSolution(alpha, 0.0, 0.5 * alpha * b1)


class _Run(nn.Module):
    """Holds ``model`` as a child so that ``functional_call`` can re-parametrize it around
    an arbitrary closure (``training_step``, a user's loss lambda) instead of ``forward``."""

    def __init__(self, model: nn.Module, closure: Callable[[], Any]):
        super().__init__()
        self.model = model
        self._closure = closure

    def forward(self) -> Any:
        return self._closure()


class ExactProducts:
    """Exact ``J v`` and ``u^T H u'`` for one batch, by re-running the loss closure.

    Args:
        model: the root module whose parameters the tangents address (by qualified name).
        output_module: the submodule (or ``model``) whose forward output is the model output f.
        closure: re-computes the batch loss (a scalar tensor) at the current parameters; it must
            call ``output_module`` exactly once.
        before_each: called before every re-run (e.g. to reset the random state and buffers, so
            that every re-run sees the same dropout masks).
    """

    def __init__(
        self,
        model: nn.Module,
        output_module: nn.Module,
        closure: Callable[[], Any],
        before_each: Callable[[], None] | None = None,
    ):
        self.model = model
        self.output_module = output_module
        self.run = _Run(model, closure)
        self.before_each = before_each or (lambda: None)

    # -- J v --------------------------------------------------------------------------------------
    def jvp(self, tangents: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, f, J v)`` at the current parameters, ``v`` given by parameter name.

        Parameters without a tangent are constants. Runs under ``torch.no_grad`` (forward-mode
        only), so no autograd graph is built and no training hook that needs grad mode fires.
        """
        params = dict(self.model.named_parameters())
        unknown = sorted(set(tangents) - set(params))
        if unknown:
            raise ValueError(f"Invalid tangents for {unknown}: not parameters of the model.")
        outputs: list[Any] = []
        handle = self.output_module.register_forward_hook(lambda m, a, o: outputs.append(o))
        self.before_each()
        try:
            with torch.no_grad(), fwAD.dual_level():
                duals = {
                    f"model.{name}": fwAD.make_dual(  # type: ignore[no-untyped-call]
                        params[name].detach(), t.to(params[name])
                    )
                    for name, t in tangents.items()
                }
                loss = _loss_tensor(functional_call(self.run, duals, ()))
                f = self._one_output(outputs)
                loss_primal = fwAD.unpack_dual(loss).primal  # type: ignore[no-untyped-call]
                f_primal, f_tangent = fwAD.unpack_dual(f)  # type: ignore[no-untyped-call]
        finally:
            handle.remove()
        if f_tangent is None:  # the output does not depend on the tangent parameters
            f_tangent = torch.zeros_like(f_primal)
        return loss_primal.detach().clone(), f_primal.detach().clone(), f_tangent.detach().clone()

    # -- u^T H u' ----------------------------------------------------------------------------------
    def output_hessian(self, f: Tensor, directions: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(g, H)`` with ``g_i = dL/df . u_i`` and ``H_ij = u_i^T (d^2 L / df^2) u_j``.

        Exact second derivatives of ``t -> L(f + sum_i t_i u_i)`` at ``t = 0`` (reverse over
        reverse on a k-vector ``t``), with the output module's forward shadowed by that line, so
        the network before the output does not run (it does when ``output_module`` is a
        submodule: then it runs with detached parameters). Returned in float64.
        """
        k = len(directions)
        t = torch.zeros(k, dtype=f.dtype, device=f.device, requires_grad=True)
        f0 = f.detach()
        us = [u.detach().to(f0.dtype) for u in directions]
        calls = [0]

        def injected(*args: Any, **kwargs: Any) -> Tensor:
            calls[0] += 1
            return f0 + sum(t[i] * us[i] for i in range(k))

        module = self.output_module
        shadowed = module.__dict__.get("forward")
        module.forward = injected  # instance attribute: nn.Module.__call__ uses self.forward
        detached = {f"model.{n}": p.detach() for n, p in self.model.named_parameters()}
        self.before_each()
        try:
            with torch.enable_grad():
                loss = _loss_tensor(functional_call(self.run, detached, ()))
                if calls[0] != 1:
                    raise RuntimeError(_calls_message(calls[0]))
                if not loss.requires_grad:
                    raise RuntimeError(
                        "K-FAC step_rule='quadratic': the loss does not depend on the model "
                        "output captured from the output module; set output_module to the "
                        "submodule whose output the loss is computed from."
                    )
                (g,) = torch.autograd.grad(loss, t, create_graph=True)
                rows: list[Tensor | None] = [None] * k  # linear in the output: no curvature
                if g.requires_grad:
                    rows = [
                        torch.autograd.grad(g[i], t, retain_graph=i + 1 < k, allow_unused=True)[0]
                        for i in range(k)
                    ]
        finally:
            if shadowed is None:
                del module.forward
            else:
                module.forward = shadowed
        hess = torch.stack([r if r is not None else torch.zeros_like(t) for r in rows])
        return g.detach().double(), hess.detach().double()

    # -- the loss ----------------------------------------------------------------------------------
    def loss(self) -> float:
        """The closure's loss at the current parameters (no grad), as a float."""
        self.before_each()
        with torch.no_grad():
            return float(_loss_tensor(self.run()))

    def _one_output(self, outputs: list[Any]) -> Tensor:
        if len(outputs) != 1:
            raise RuntimeError(_calls_message(len(outputs)))
        f = outputs[0]
        if not isinstance(f, Tensor) or not f.is_floating_point():
            raise RuntimeError(
                f"K-FAC step_rule='quadratic': the output module returned a "
                f"{type(f).__name__}, not a floating-point tensor. Set output_module to the "
                "submodule whose output (logits, means) the loss is computed from."
            )
        return f


def _calls_message(calls: int) -> str:
    return (
        f"K-FAC step_rule='quadratic': the output module ran {calls} times while the loss "
        "was re-computed; the exact quadratic model needs exactly one model output per step. "
        "Set output_module to the qualified name of the submodule whose single output the "
        "loss is computed from (output_module=None means the model's own forward)."
    )


def _loss_tensor(output: Any) -> Tensor:
    """The scalar loss in a closure's result (a tensor or a mapping with "loss")."""
    if isinstance(output, dict) or hasattr(output, "keys"):
        output = output.get("loss") if hasattr(output, "get") else None
    if not isinstance(output, Tensor) or output.numel() != 1:
        raise RuntimeError(
            "K-FAC step_rule='quadratic': the loss closure must return the scalar loss (a 0-d "
            f"tensor, or a mapping with a 'loss' entry), got {type(output).__name__}."
        )
    return output.reshape(())


def dot(
    xs: Sequence[Tensor], ys: Sequence[Tensor], weights: Sequence[float] | None = None
) -> float:
    """``sum_p w_p <x_p, y_p>`` in float64 (one host sync)."""
    if not xs:
        return 0.0
    terms = [
        (x.double() * y.double()).sum() * (1.0 if weights is None else float(w))
        for x, y, w in zip(xs, ys, weights if weights is not None else [1.0] * len(xs))
    ]
    value = float(torch.stack(terms).sum())
    return value if math.isfinite(value) else math.nan
