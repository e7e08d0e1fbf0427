"""``step_rule="quadratic"``: step size and momentum from the exact quadratic model (M&G 2015).

Martens & Grosse (2015, sec. 7) do not hand the K-FAC direction to a tuned optimizer: each step
they choose ``alpha`` and ``mu`` of ``delta = alpha Delta + mu delta_0`` (``Delta = -F~^-1 grad``
the K-FAC direction, ``delta_0`` the previous update) by minimising the quadratic model

    M(delta) = 1/2 delta^T (C + (lambda + eta) I) delta + grad^T delta

with ``C`` the exact Gauss-Newton matrix of the batch (core/quadratic_model.py: a 2 x 2 solve
from exact products), and they adapt ``lambda`` by the Levenberg-Marquardt rule on
``rho = (h(theta + delta) - h(theta)) / (M(delta) - 1/2 lambda |delta|^2)`` (sec. 6.5; the
damping term is left out of rho's denominator as kfac-jax does by default: on an exactly
quadratic objective rho is then 1; ``eta`` stays in, and the L2 term's exact change is added to
``h``). :class:`QuadraticStepRule` does this on top of the engine.

What one step does (``KFACPreconditioner.step(optimizer, closure=...)``; the callback calls it
in ``on_before_optimizer_step``):

1. ``P`` = the parameters of the preconditioned layers that the optimizer holds and that have a
   gradient. For each, ``eta`` = its param group's ``weight_decay`` (0 without one): ``eta
   theta`` is added to its gradient (an L2 term of the objective, as SGD applies it).
2. The engine preconditions as usual (factors, decompositions, KL clip): ``Delta = -.grad``.
   Any scaling of ``Delta`` (the KL clip) is absorbed by ``alpha``; the optimizer's ``lr`` and
   momentum do not act on ``P``.
3. The closure (the loss of the same batch) is re-run with forward-mode tangents ``Delta`` and
   ``delta_0`` (two passes, one when ``delta_0 = 0``), then once more with the output replaced
   by a line, for the exact ``J v`` and ``u^T H u'``; every re-run starts from the same random
   state and buffers (the same dropout masks in all re-runs, not the training forward's;
   BatchNorm statistics restored), with the engine's capture hooks off.
4. ``alpha, mu`` from the 2 x 2 solve; the engine adds ``delta`` to every parameter of ``P``
   itself (``torch.no_grad``) and sets its ``.grad`` to None, so the user's optimizer, which skips
   parameters without a gradient, leaves them alone (no lr, momentum, weight decay or state
   update for them; Lightning's gradient clipping does not see them either). Every other
   parameter keeps its raw gradient and the optimizer's step.
5. On adaptation steps (``adaptive_damping=True``, every ``adaptive_damping_interval`` steps) the
   closure is evaluated at ``theta + delta`` and ``lambda`` moves by the engine's LM rule
   (core/damping.py, ``DampingControl.apply_rho``). ``lambda`` is the engine's damping of each
   layer (``pre.damping`` with no overrides in ``damping_mode="absolute"``), the same that damps
   ``F~``; with ``compute_method="inverse"`` (factored damping) that is the paper's
   ``gamma = sqrt(lambda)``.

A step whose model is not finite or not positive definite moves nothing (``P`` stays, its
``.grad`` is None), resets ``delta_0``, raises ``lambda`` by the LM factor when adapting, is
counted (``counters["step_rule_skipped"]``) and warned about once (raised with
``nonfinite="raise"``). The cost: two forward-mode passes of the loss, one pass of the loss
alone after the output, and one more forward on adaptation steps.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_kfac.config import KFACConfig
from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.damping import DampingControl, clamp, lm_update, model_device, omega
from lightning_kfac.core.distributed import Communicator
from lightning_kfac.core.mc import resolve_output_module
from lightning_kfac.core.quadratic_model import ExactProducts, StepSolution, dot, solve_step

Closure = Callable[[], Any]
#: ``(qualified name, parameter, eta, block)`` of one preconditioned parameter.
Param = tuple[str, nn.Parameter, float, KFACBlock]

#: Statistics of the last step, merged into ``pre.last_stats`` (and logged as ``kfac/<key>``).
STATS = ("alpha", "mu", "model_change", "rho")


@dataclass
class Pending:
    """What :meth:`QuadraticStepRule.prepare` kept for :meth:`QuadraticStepRule.finish`."""

    params: list[Param]
    grads: list[Tensor]  # raw gradients (plus eta theta) before preconditioning
    closure: Closure  # re-computes the batch loss


class QuadraticStepRule:
    """Owns ``delta_0`` and chooses the quadratic-model step around the engine's own step.

    The engine calls :meth:`prepare` before its step (factors, decompositions, preconditioning)
    and :meth:`finish` after it; it hands over the blocks and the clock, the rule never sees the
    engine.

    Args:
        model: the (unwrapped) model; ``output_module`` names its submodule giving ``f(x)``.
        config: ``output_module``, ``nonfinite`` (and the LM rule's settings).
        comm: collectives across ranks (the curvature of the global batch).
        damping: the engine's damping control (each layer's lambda; the LM update).
        counters: the engine's counters (``step_rule_steps``, ``step_rule_skipped``).

    Attributes:
        previous: ``delta_0`` by qualified parameter name (empty before the first step).
        last: ``alpha``, ``mu``, ``model_change`` (M(delta)) and ``rho`` (nan when not adapting)
            of the last step.
    """

    def __init__(
        self,
        model: nn.Module,
        config: KFACConfig,
        comm: Communicator,
        damping: DampingControl,
        counters: dict[str, int],
    ):
        self.model = model
        self.config = config
        self.comm = comm
        self.damping = damping
        self.counters = counters
        self.output_module = resolve_output_module(model, config.output_module)
        self.previous: dict[str, Tensor] = {}
        self.last: dict[str, float] = {}
        self._warned = False

    # -- one step -----------------------------------------------------------------------------
    def prepare(
        self,
        optimizer: torch.optim.Optimizer | None,
        closure: Closure | None,
        blocks: list[KFACBlock],
    ) -> Pending:
        """Before the engine's step: the parameters ``P`` of ``blocks`` (the preconditioned
        layers ``optimizer`` steps), ``eta theta`` added to their gradients, the gradients kept."""
        if closure is None:
            raise ValueError(
                "Invalid closure=None for step_rule='quadratic': pre.step(optimizer, closure=...) "
                "needs a closure that re-computes the batch loss, e.g. "
                "closure=lambda: loss_fn(model(x), y) (the KFACCallback passes training_step)."
            )
        params = self._params(optimizer, blocks)
        for _, p, eta, _ in params:
            if eta:
                p.grad.add_(p.detach(), alpha=eta)  # type: ignore[union-attr]
        grads = [p.grad.detach().clone() for _, p, _, _ in params]  # type: ignore[union-attr]
        return Pending(params, grads, closure)

    def finish(
        self, pending: Pending, t: int, blocks: Iterable[KFACBlock]
    ) -> dict[str, float] | None:
        """After the engine's step at clock ``t``: choose ``alpha``, ``mu`` and move ``P``.

        ``blocks``: every block (their capture is off during the re-runs). Returns the step's
        statistics (None when no preconditioned parameter had a gradient)."""
        params, grads, closure = pending.params, pending.grads, pending.closure
        if not params:
            return None
        directions = [-p.grad.detach().clone() for _, p, _, _ in params]  # type: ignore[union-attr]
        for _, p, _, _ in params:
            p.grad = None
        previous = [self.previous.get(name) for name, _, _, _ in params]
        with _replay(self.model, blocks, closure, self.output_module) as products:
            solution, loss_before = self._solve(products, params, grads, directions, previous)
            deltas = self._apply(params, solution, directions, previous, t)
            rho = math.nan
            if self.damping.adaptation_step(t):
                rho = self._adapt(products, params, solution, deltas, loss_before)
        self.counters["step_rule_steps"] = self.counters.get("step_rule_steps", 0) + 1
        self.last = {
            "alpha": solution.alpha,
            "mu": solution.mu,
            "model_change": solution.model_change,
            "rho": rho,
        }
        return dict(self.last)

    def _params(
        self, optimizer: torch.optim.Optimizer | None, blocks: list[KFACBlock]
    ) -> list[Param]:
        """``(name, param, eta, block)`` of every preconditioned parameter with a gradient."""
        names = {id(p): n for n, p in self.model.named_parameters()}  # tied: first name
        decay: dict[int, float] = {}
        if optimizer is not None:
            decay = {
                id(p): float(g.get("weight_decay", 0.0) or 0.0)
                for g in optimizer.param_groups
                for p in g["params"]
            }
        out: list[Param] = []
        seen: set[int] = set()
        for block in blocks:
            for p in block.kind.params:
                if id(p) in seen or p.grad is None or not p.requires_grad or id(p) not in names:
                    continue
                seen.add(id(p))
                out.append((names[id(p)], cast(nn.Parameter, p), decay.get(id(p), 0.0), block))
        return out

    def _solve(
        self,
        products: ExactProducts,
        params: list[Param],
        grads: list[Tensor],
        directions: list[Tensor],
        previous: list[Tensor | None],
    ) -> tuple[StepSolution, float]:
        """The 1 x 1 or 2 x 2 model ``K x = -b`` from exact products;
        returns (solution, h(theta))."""
        names = [name for name, _, _, _ in params]
        loss, f, u1 = products.jvp(dict(zip(names, directions)))
        vectors, outputs = [directions], [u1]
        if any(d is not None for d in previous):
            zeros = [torch.zeros_like(v) if d is None else d for v, d in zip(directions, previous)]
            if dot(zeros, zeros) > 0.0:
                vectors.append(zeros)
                outputs.append(products.jvp(dict(zip(names, zeros)))[2])
        _, curvature = products.output_hessian(f, outputs)
        comm = self.comm
        if comm.world_size > 1:  # C of the global batch: the mean of the ranks' local C
            comm.all_reduce_sum_([curvature])
            curvature = curvature / comm.world_size
        weights = [self._damping(block) + eta for _, _, eta, block in params]
        k = len(vectors)
        K = torch.zeros(k, k, dtype=torch.float64)
        b = torch.zeros(k, dtype=torch.float64)
        for i in range(k):
            b[i] = dot(grads, vectors[i])
            for j in range(k):
                K[i, j] = curvature[i, j] + dot(vectors[i], vectors[j], weights)
        return solve_step(K, b), float(loss)

    def _apply(
        self,
        params: list[Param],
        solution: StepSolution,
        directions: list[Tensor],
        previous: list[Tensor | None],
        t: int,
    ) -> list[Tensor]:
        """``delta = alpha Delta + mu delta_0`` added to the parameters; kept as next delta_0."""
        if not solution.ok:
            self._skipped(solution.reason, t)
            self.previous = {}
            return [torch.zeros_like(d) for d in directions]
        deltas = []
        with torch.no_grad():
            for (_name, p, _, _), direction, prev in zip(params, directions, previous):
                delta = direction * solution.alpha
                if prev is not None and solution.mu != 0.0:
                    delta = delta + prev.to(delta) * solution.mu
                p.add_(delta.to(p.dtype))
                deltas.append(delta)
        self.previous = {name: d for (name, _, _, _), d in zip(params, deltas)}
        return deltas

    def _adapt(
        self,
        products: ExactProducts,
        params: list[Param],
        solution: StepSolution,
        deltas: list[Tensor],
        loss_before: float,
    ) -> float:
        """LM rule on ``rho`` (damping term out of the model, L2 term's exact change in h)."""
        control = self.damping
        if not solution.ok:  # no usable model: more damping, as for an overshoot
            control.value = clamp(
                self.config, lm_update(control.value, -math.inf, omega(self.config))
            )
            control.last_rho = -math.inf
            control.adaptations += 1
            return -math.inf
        damping = [self._damping(block) for _, _, _, block in params]
        predicted = solution.model_change - 0.5 * dot(deltas, deltas, damping)
        after = products.loss()
        etas = [eta for _, _, eta, _ in params]
        if any(
            etas
        ):  # h includes eta/2 |theta|^2: its change is eta (theta_old.delta + |delta|^2/2)
            old = [p.detach() - d.to(p.dtype) for (_, p, _, _), d in zip(params, deltas)]
            after += dot(old, deltas, etas) + 0.5 * dot(deltas, deltas, etas)
        return control.apply_rho(loss_before, after, predicted, model_device(self.model))

    def _damping(self, block: KFACBlock) -> float:
        """The layer's absolute damping lambda (the engine's, see ``DampingControl``)."""
        if block.A is None:
            return block.damping * self.damping.multiplier
        return self.damping.layer_damping(block)

    def _skipped(self, reason: str, t: int) -> None:
        self.counters["step_rule_skipped"] = self.counters.get("step_rule_skipped", 0) + 1
        message = (
            f"K-FAC step_rule='quadratic': step {t} moved no preconditioned "
            f"parameter ({reason}); delta_0 is reset (on adaptation steps the damping is "
            "raised). Counted in counters['step_rule_skipped']."
        )
        if str(self.config.nonfinite) == "raise" and "non-finite" in reason:
            raise FloatingPointError(message)
        if not self._warned:  # once per run
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=6)  # the caller of pre.step()

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"previous": {n: d.detach().clone() for n, d in self.previous.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        unknown = sorted(set(state.get("previous", {})) - set(params))
        if unknown:
            raise ValueError(
                f"K-FAC state has step_rule updates for parameters {unknown} that "
                "this model does not have."
            )
        self.previous = {n: d.to(params[n].device) for n, d in state.get("previous", {}).items()}


@contextlib.contextmanager
def _replay(
    model: nn.Module, blocks: Iterable[KFACBlock], closure: Closure, output_module: nn.Module
) -> Iterator[ExactProducts]:
    """Exact products for re-runs of ``closure`` that leave no trace.

    Every re-run starts from the random state and buffers of the moment this context was
    entered; on exit both are restored (the training RNG streams and BatchNorm statistics are
    untouched) and the engine's capture hooks, switched off inside, are switched back.
    """
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    hooks = [(block, block.capturing, block.row_limit) for block in blocks]

    def reset() -> None:
        torch.set_rng_state(cpu_state)
        for device, state in zip(devices, cuda_states):
            torch.cuda.set_rng_state(state, device)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)

    for block, _, _ in hooks:
        block.capturing, block.row_limit = False, 0
    try:
        yield ExactProducts(model, output_module, closure, before_each=reset)
    finally:
        reset()
        for block, capturing, row_limit in hooks:
            block.capturing, block.row_limit = capturing, row_limit


def trainer_refusal(trainer: Any, module: Any) -> str | None:
    """Why the callback cannot run ``step_rule="quadratic"`` in this Trainer, or None."""
    if not module.automatic_optimization:
        return (
            "KFACCallback(step_rule='quadratic') needs automatic optimization: it re-runs "
            "training_step on the batch, which under manual optimization would step the "
            "optimizers again. Use step_rule='optimizer'."
        )
    if trainer.accumulate_grad_batches != 1:
        return (
            f"KFACCallback(step_rule='quadratic') needs accumulate_grad_batches=1 (got "
            f"{trainer.accumulate_grad_batches}): its exact curvature products re-run one "
            "batch. Use a larger batch, or step_rule='optimizer'."
        )
    return None
