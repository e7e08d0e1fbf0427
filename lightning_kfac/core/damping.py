"""Damping over time: schedules and Levenberg-Marquardt adaptation
(Martens & Grosse 2015, sec. 6.5).

The engine keeps one global damping ``lambda_t`` (``pre.damping``). A layer whose
``layer_overrides`` give it its own damping ``d_l`` uses ``d_l * lambda_t / lambda_0`` (every group
moves by the same factor), times its scale ``(tr A/dim A)(tr G/dim G)`` in
``damping_mode="relative"``. ``compute_method="eigen"`` applies the current damping at every step;
``"inverse"`` bakes it into the inverses, so a change takes effect at the next decomposition.

Schedules, by name and numbers (serializable), on the 0-based optimizer-step clock t:

- ``constant``:    ``lambda_t = lambda_0``
- ``exponential``: ``lambda_t = lambda_0 * decay ** (t / step_size)``
- ``step``:        ``lambda_t = lambda_0 * decay ** floor(t / step_size)``

always clamped to ``[min_damping, max_damping]``.

Adaptive damping (LM rule, M&G sec. 6.5): on every T-th preconditioned step the engine keeps the
raw gradient and the parameters; after the optimizer step the caller passes the loss before and
after the step on the same batch, and

    rho = (L(theta + delta) - L(theta)) / M(delta),
    M(delta) = sum_layers [ <grad W~, D> + 1/2 <D, G D A> + 1/2 lambda_l |D|^2 ]
               + sum_other params <grad p, delta_p>,

with ``D`` the layer's step in the ``W~`` layout (``vec(G D A) = (A (x) G) vec(D)``, the K-FAC
curvature of the mean loss, for every layer with factors; parameters that are not
preconditioned enter to first order; in relative mode ``lambda_l`` is scaled by the current
factors' mean eigenvalues, so every rank computes the same model).
``rho > 3/4``: ``lambda *= omega``; ``rho < 1/4``: ``lambda /= omega``; ``omega = (19/20)**T``
unless ``adaptive_damping_factor`` is set. A step whose new loss is not finite counts as ``rho =
-inf`` (damping up); one the model does not predict to decrease the loss (``M(delta) >= 0``, e.g. a
zero step) leaves the damping alone and returns ``nan``. Under DDP the two losses and ``M(delta)``
are averaged over ranks first, so every rank takes the same decision.

With ``step_rule="quadratic"`` (lightning_kfac/step_rule.py) the same LM update
(:meth:`DampingControl.apply_rho`) runs on the exact quadratic model of that rule instead, and
the snapshot above is never taken (:meth:`DampingControl.due` is False).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_kfac.config import KFACConfig
from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.distributed import Communicator

Loss = float | Tensor | Callable[[], Any]


def scheduled_damping(config: KFACConfig, step: int) -> float:
    """``lambda_t`` of the configured schedule at optimizer step ``step``, clamped."""
    schedule = str(config.damping_schedule)
    if schedule == "constant":
        value = config.damping
    elif schedule == "exponential":
        value = config.damping * config.damping_decay ** (step / config.damping_step_size)
    elif schedule == "step":
        value = config.damping * config.damping_decay ** (step // config.damping_step_size)
    else:  # pragma: no cover - KFACConfig validates the name
        raise ValueError(f"Invalid damping_schedule={schedule!r}")
    return clamp(config, value)


def clamp(config: KFACConfig, value: float) -> float:
    """``value`` limited to ``[min_damping, max_damping]``."""
    high = math.inf if config.max_damping is None else config.max_damping
    return min(max(value, config.min_damping), high)


def omega(config: KFACConfig) -> float:
    """The LM factor: ``adaptive_damping_factor`` or ``(19/20) ** T`` (M&G sec. 6.5)."""
    if config.adaptive_damping_factor is not None:
        return config.adaptive_damping_factor
    return (19.0 / 20.0) ** config.adaptive_damping_interval


def lm_update(damping: float, rho: float, factor: float) -> float:
    """``damping * factor`` if ``rho > 3/4``, ``damping / factor`` if ``rho < 1/4`` (or -inf)."""
    if math.isnan(rho):
        return damping
    if rho > 0.75:
        return damping * factor
    if rho < 0.25:
        return damping / factor
    return damping


def curvature_product(block: KFACBlock, D: Tensor) -> Tensor:
    """``G D A``, i.e. ``(A (x) G) vec(D)``, each side in its structure (core/factors.py)."""
    A, G = cast(Tensor, block.A), cast(Tensor, block.G)  # a layer with factors
    GD: Tensor = block.g_structure.product(G.double(), D, "left")
    out: Tensor = block.a_structure.product(A.double(), GD, "right")
    return out


def block_model(grad: Tensor, delta: Tensor, block: KFACBlock, damping: float) -> float:
    """``<grad, D> + 1/2 <D, G D A> + 1/2 damping |D|^2`` for one layer (float64 sums)."""
    grad, delta = grad.double(), delta.double()
    curv = curvature_product(block, delta)
    quad = float((delta * curv).sum()) + damping * float(delta.square().sum())
    return float((grad * delta).sum()) + 0.5 * quad


@dataclass
class _LayerTerm:
    block: KFACBlock
    grad: Tensor  # raw grad W~ at theta
    before: list[Tensor]  # the layer's parameters at theta
    damping: float  # absolute damping the step was preconditioned with


@dataclass
class _ParamTerm:
    param: nn.Parameter
    grad: Tensor
    before: Tensor


class DampingControl:
    """The current global damping: schedule or LM adaptation, plus its checkpoint state.

    Args:
        config: the options (``damping``, the schedule, the LM rule's settings).
        comm: collectives across ranks (the LM decision is averaged over them).

    Attributes:
        value: the current global damping ``lambda_t``.
        last_rho: the last reduction ratio (nan before the first adaptation).
        adaptations: how many times the LM rule ran.
    """

    def __init__(self, config: KFACConfig, comm: Communicator | None = None):
        self.config = config
        self.comm = Communicator() if comm is None else comm
        self.value = config.damping
        self.last_rho = math.nan
        self.adaptations = 0
        self.pending: tuple[int, list[_LayerTerm], list[_ParamTerm]] | None = None
        self._warned = False

    @property
    def multiplier(self) -> float:
        """``lambda_t / lambda_0``: the factor every layer's own damping is scaled by."""
        return self.value / self.config.damping

    def at_step(self, step: int) -> None:
        """Move a scheduled damping to step ``step`` (no-op for constant / adaptive)."""
        if str(self.config.damping_schedule) != "constant":
            self.value = scheduled_damping(self.config, step)

    def adaptation_step(self, step: int) -> bool:
        """True on the adaptation steps: every ``adaptive_damping_interval``-th step."""
        return self.config.adaptive_damping and step % self.config.adaptive_damping_interval == 0

    def due(self, step: int) -> bool:
        """An adaptation step on the K-FAC model (snapshot now, ``adapt`` after the step).

        Never with ``step_rule="quadratic"``: that rule adapts on the exact model itself
        (lightning_kfac/step_rule.py, through :meth:`apply_rho`)."""
        return self.adaptation_step(step) and str(self.config.step_rule) == "optimizer"

    # -- adaptation ------------------------------------------------------------------------------
    def snapshot(
        self,
        blocks: Iterable[KFACBlock],
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        step: int,
    ) -> None:
        """Keep raw gradients and parameters before this step's preconditioning (memory: 2x the
        trained parameters, released by :meth:`adapt`). ``blocks``: the preconditioned layers;
        the parameters are ``optimizer``'s (``model``'s without one)."""
        if self.pending is not None and not self._warned:
            self._warned = True
            warnings.warn(
                f"K-FAC: adaptive_damping=True but update_damping() was not called after step "
                f"{self.pending[0]}; that adaptation is dropped. Call "
                "pre.update_damping(loss_before, loss_after) after optimizer.step() (the "
                "Lightning callback does it for you).",
                RuntimeWarning,
                stacklevel=4,
            )
        params = _trained_params(model, optimizer)
        wanted = {id(p) for p in params}
        layers: list[_LayerTerm] = []
        covered: set[int] = set()
        for block in blocks:
            kind = block.kind
            if id(kind.weight) not in wanted or block.A is None:
                continue
            grad = kind.grad_matrix()
            if grad is None:
                continue
            layers.append(
                _LayerTerm(
                    block,
                    grad.detach().to(block.dtype).clone(),
                    [p.detach().clone() for p in kind.params],
                    self.layer_damping(block),
                )
            )
            covered.update(id(p) for p in kind.params)
        others = [
            _ParamTerm(p, p.grad.detach().clone(), p.detach().clone())
            for p in params
            if id(p) not in covered and p.grad is not None
        ]
        self.pending = (step, layers, others)

    def layer_damping(self, block: KFACBlock) -> float:
        """The layer's absolute damping for the model: its damping times ``lambda_t / lambda_0``,
        times ``(tr A/dim A)(tr G/dim G)`` of the current factors in relative mode (the same on
        every rank, whichever rank holds the decomposition)."""
        damping = block.damping * self.multiplier
        if str(self.config.damping_mode) == "relative":
            scale = block.a_structure.mean_eigenvalue(
                cast(Tensor, block.A)
            ) * block.g_structure.mean_eigenvalue(cast(Tensor, block.G))
            damping = damping * scale if scale > 0 else damping
        return damping

    def model_decrease(self) -> float:
        """``M(delta)`` for the pending snapshot, with delta = parameters now - at the snapshot."""
        assert self.pending is not None
        _, layers, others = self.pending
        total = 0.0
        for term in layers:
            kind, block = term.block.kind, term.block
            now = [p.detach() for p in kind.params]
            diffs = [n.to(b.dtype) - b for n, b in zip(now, term.before)]
            delta = kind.as_matrix(diffs[0], diffs[1] if len(diffs) > 1 else None)
            total += block_model(term.grad, delta.to(block.dtype), block, term.damping)
        for other in others:
            change = other.param.detach() - other.before
            total += float((other.grad.double() * change.double()).sum())
        return total

    def adapt(
        self, loss_before: Loss, loss_after: Loss, device: torch.device | None = None
    ) -> float | None:
        """Apply the LM rule after an adaptation step; None when no snapshot is pending.
        ``device``: where the model lives (the collective's buffer under DDP)."""
        if self.pending is None:
            return None
        before, after = _as_float(loss_before), _as_float(loss_after)
        predicted = self.model_decrease()
        self.pending = None
        return self.apply_rho(before, after, predicted, device)

    def apply_rho(
        self, before: float, after: float, predicted: float, device: torch.device | None = None
    ) -> float:
        """``rho = (after - before) / predicted`` and the LM update of the damping; returns rho.

        ``predicted`` is the model's change ``M(delta) - M(0)``. Under DDP the three numbers are
        averaged over ranks first (one decision everywhere), in a buffer on ``device`` (the
        model's; the CPU when None).
        """
        comm = self.comm
        if comm.world_size > 1:  # one decision for all ranks: average both losses (and M)
            device = torch.device("cpu") if device is None else device
            values = torch.tensor([before, after, predicted], dtype=torch.float64, device=device)
            comm.all_reduce_sum_([values])
            before, after, predicted = (float(v) / comm.world_size for v in values.tolist())
        if not math.isfinite(before):
            rho = math.nan
        elif not math.isfinite(after):
            rho = -math.inf
        elif not (math.isfinite(predicted) and predicted < 0.0):
            rho = math.nan
        else:
            rho = (after - before) / predicted
        self.last_rho = rho
        self.adaptations += 1
        self.value = clamp(self.config, lm_update(self.value, rho, omega(self.config)))
        return rho

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "last_rho": self.last_rho, "adaptations": self.adaptations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore an adapted damping; a constant or scheduled one follows the current options
        (``damping`` and the clock), so resuming with another ``damping`` uses the new value."""
        if self.config.adaptive_damping:
            self.value = float(state.get("value", self.value))
        self.last_rho = float(state.get("last_rho", self.last_rho))
        self.adaptations = int(state.get("adaptations", self.adaptations))
        self.pending = None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _trained_params(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> list[nn.Parameter]:
    if optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    else:
        params = list(model.parameters())
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _as_float(loss: Loss) -> float:
    """A loss given as a number, a tensor or a closure (called under ``torch.no_grad``)."""
    if callable(loss):
        with torch.no_grad():
            loss = loss()
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"Invalid loss of shape {tuple(loss.shape)}: update_damping needs a "
                "scalar loss (a number, a 0-d tensor or a closure returning one)."
            )
        return float(loss.detach())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise ValueError(
        f"Invalid loss={loss!r}: update_damping needs a number, a scalar tensor or a "
        "closure returning one."
    )
