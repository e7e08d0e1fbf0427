"""The true (Monte-Carlo) Fisher: ``g`` from labels sampled from the model's own predictive.

K-FAC approximates the Fisher ``F = E_x E_{y~p(y|x,theta)}[grad log p grad log p^T]`` (Martens &
Grosse 2015, sec. 5; ``E_{y~p}[grad log p] = 0`` and ``E[H] = F`` for the negative
log-likelihood). The empirical Fisher uses the training labels instead of ``y~p``; here, on
factor-update steps, one extra backward replaces them by sampled labels:

1. the capture forward hook keeps each preconditioned layer's output (its autograd edge, taken
   before any in-place op such as ``ReLU(inplace=True)`` can rebase the tensor's history);
2. a forward hook on the model (or on ``output_module``) keeps the model output ``f(x)``;
3. ``backward()`` samples ``y~ ~ p(y|f(x))`` (``categorical``: logits on the last dimension;
   ``bernoulli``: logits; ``gaussian``: mean with variance ``gaussian_variance``), forms
   ``nll = sum_rows -log p(y~|f(x))`` and calls ``torch.autograd.grad(nll, kept_outputs,
   retain_graph=True)``. Parameter ``.grad`` fields are never touched. Because the loss is a
   *sum*, the gradient of a row is that example's own ``g_n = d(-log p(y~_n))/ds_n``
   (docs/conventions.md), so it is added with ``per_example=True``; with ``mc_samples = S`` each of
   the S sampled losses adds its own ``sum g g^T`` and its rows to the divisor, i.e. ``G^`` averages
   over examples and samples (scale ``1/S``).

Sampling uses a dedicated ``torch.Generator`` seeded from ``torch.initial_seed()`` (plus the rank)
so the user's random stream is untouched; its state is saved for a bit-identical resume.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac.config import KFACConfig
from lightning_kfac.core.capture import Capture, Route, is_transformed, training_forward

try:  # torch >= 2.2: an edge survives in-place ops on the tensor that produced it
    from torch.autograd.graph import get_gradient_edge as _edge
except ImportError:  # pragma: no cover - older torch: differentiate the tensor itself

    def _edge(t: Tensor) -> Any:  # type: ignore[misc]
        return t


def resolve_output_module(model: nn.Module, name: str | None) -> nn.Module:
    """The module whose forward output is the model output (``None``: the model itself)."""
    if name is None or name == "":
        return model
    modules = dict(model.named_modules())
    if name not in modules:
        names = [n for n in modules if n]
        shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
        raise ValueError(
            f"Invalid output_module={name!r}: the model has no submodule with that "
            f"qualified name; allowed: None (the model's own output) or one of "
            f"[{shown}]."
        )
    module: nn.Module = modules[name]
    return module


class MCFisher:
    """Keeps layer outputs and the model output on factor-update steps; samples and backprops.

    Args:
        model: the (unwrapped) model; its forward output, or ``output_module``'s, is ``f(x)``.
        capture: the engine's ``Capture``; its ``output_sink`` is set to keep layer outputs, and
            the model output is kept only while it captures (``capture.capturing``).
        config: ``likelihood``, ``mc_samples``, ``gaussian_variance``, ``output_module``.
        rank: this process's rank (added to the sampling seed).
    """

    def __init__(self, model: nn.Module, capture: Capture, config: KFACConfig, rank: int = 0):
        self.likelihood = str(config.likelihood.value)
        self.samples = int(config.mc_samples)
        self.loss_mean = str(config.loss_reduction.value) == "mean"
        self.output_reduction = str(config.output_reduction.value)
        self.variance = float(config.gaussian_variance)
        self.output_name = config.output_module
        self.capture = capture
        module = resolve_output_module(model, config.output_module)
        self._kept: list[tuple[Route, Any, Tensor | None]] = []
        self._output: Any = None
        self.calls = 0  # mc backward passes since the last finish_step()
        self.seed = (torch.initial_seed() + 1_000_003 * int(rank)) % (2**63)
        self.generator: torch.Generator | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._rng_mark: dict[str, Any] | None = None  # generator state before this step's draws
        self._unfed: set[str] = set()
        self._handle = module.register_forward_hook(self._on_output)
        capture.output_sink = self._keep

    # -- hooks -----------------------------------------------------------------------------------
    def _keep(self, route: Route, output: Tensor, a_rows: Tensor | None = None) -> None:
        """Capture's ``output_sink``: remember the layer output's autograd edge (and EKFAC rows)."""
        self._kept.append((route, _edge(output), a_rows))

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (training_forward(module) and self.capture.capturing):
            return None
        if isinstance(output, Tensor) and is_transformed(output):
            return None
        self._output = output
        return None

    def remove(self) -> None:
        """Take the model-output hook off and forget everything kept."""
        self._handle.remove()
        self.capture.output_sink = None
        self.discard()

    def discard(self) -> None:
        self._kept, self._output = [], None

    def captured(self) -> tuple[Any, ...]:
        """What this step has kept so far (outputs, draws' mark, calls), for ``put_back``."""
        return self._kept, self._output, self.calls, self._rng_mark

    def put_back(self, captured: tuple[Any, ...]) -> None:
        """Restore what ``captured`` returned (a step retried on the same backward)."""
        self._kept, self._output, self.calls, self._rng_mark = captured

    # -- the extra backward --------------------------------------------------------------------
    def backward(self, output: Tensor | None = None, *, enumerate_classes: bool = False) -> None:
        """Sample ``y~`` and add the per-example ``g g^T`` of ``-log p(y~|f)`` to every kept layer.

        ``enumerate_classes=True`` (categorical only) replaces sampling by the exact expectation:
        one backward per class c of ``sum_n w_nc (-log p(c|f_n))`` with ``w_nc = sqrt(C p_nc)``
        (detached), so the C passes together add ``sum_n sum_c p_nc g_nc g_nc^T`` over a divisor
        of ``C N`` rows: ``G^ = E_n E_{c~p}[g g^T]`` exactly (C backward passes; small C only).
        """
        kept = self._kept
        output = self._output if output is None else output
        self.discard()
        if not kept:
            return  # not a factor-update step, or no training forward since the last call
        f = self._check_output(output)
        draws = self._enumerate(f) if enumerate_classes else [(y, None) for y in self._sample(f)]
        edges = [edge for _, edge, _ in kept]
        terms = self.loss_terms(f)
        fed: dict[str, bool] = {}
        for y, weight in draws:
            nll = self.nll(f, y, weight)
            self.capture.sampling = True  # tensor hooks that fire now see sampled-loss grads
            try:
                grads = torch.autograd.grad(nll, edges, retain_graph=True, allow_unused=True)
            except RuntimeError as err:
                raise RuntimeError(
                    "K-FAC fisher_type='mc': the extra backward of the sampled loss failed "
                    f"({err}). Call mc_backward() after the forward and BEFORE loss.backward() "
                    "(the graph must still be alive)."
                ) from err
            finally:
                self.capture.sampling = False
            for (route, _, a_rows), grad in zip(kept, grads):
                fed.setdefault(route.name, False)
                if grad is None:
                    continue
                fed[route.name] = True
                self.capture.add_output_grad(
                    route, grad, per_example=True, a_rows=a_rows, loss_terms=terms
                )
        self.calls += 1
        unfed = sorted(n for n, ok in fed.items() if not ok and n not in self._unfed)
        if unfed:
            self._unfed.update(unfed)
            where = (
                "the model's output"
                if self.output_name is None
                else f"output_module={self.output_name!r}"
            )
            warnings.warn(
                f"K-FAC fisher_type='mc': layers {unfed} do not feed {where}, so their "
                "G cannot be estimated from sampled labels; they get no factor update.",
                RuntimeWarning,
                stacklevel=3,
            )

    def finish_step(self, backward_happened: bool) -> None:
        """End of an optimizer step: refuse a backward that skipped ``mc_backward``; forget."""
        pending = bool(self._kept)
        calls, self.calls = self.calls, 0
        self._rng_mark = None
        self.discard()
        if pending and calls == 0 and backward_happened:
            raise RuntimeError(
                "K-FAC fisher_type='mc': layer outputs were captured on a factor-update step but "
                "mc_backward() was never called. In a plain PyTorch loop call "
                "`pre.mc_backward()` after the forward and before `loss.backward()` (the "
                "KFACCallback does it in on_before_backward); or set fisher_type='empirical'."
            )

    # -- likelihoods -----------------------------------------------------------------------------
    def _check_output(self, output: Any) -> Tensor:
        where = (
            "the model's forward output (output_module=None)"
            if self.output_name is None
            else f"the output of output_module={self.output_name!r}"
        )
        if output is None:
            raise RuntimeError(
                f"K-FAC fisher_type='mc': no model output was captured from {where} in this "
                "training forward. Set output_module to the qualified name of the submodule "
                "whose output is the model output (e.g. the last layer), or pass it explicitly: "
                "mc_backward(output=logits)."
            )
        if not isinstance(output, Tensor):
            raise RuntimeError(
                f"K-FAC fisher_type='mc': {where} is a {type(output).__name__}, not a tensor. "
                "Set output_module to the submodule that returns the logits/mean tensor, or pass "
                "it explicitly: mc_backward(output=logits)."
            )
        if not output.is_floating_point():
            raise ValueError(
                f"Invalid model output for likelihood={self.likelihood!r}: {where} has dtype "
                f"{output.dtype}; a floating-point tensor of logits (categorical, bernoulli) or "
                "means (gaussian) is needed. Set output_module to the submodule returning it."
            )
        if self.likelihood == "categorical" and (output.dim() == 0 or output.shape[-1] < 2):
            raise ValueError(
                f"Invalid model output for likelihood='categorical': {where} has shape "
                f"{tuple(output.shape)}; logits with the classes on the last dimension (>= 2) "
                "are needed. For one logit per output use likelihood='bernoulli'; for "
                "regression likelihood='gaussian'."
            )
        if not output.requires_grad:
            raise RuntimeError(
                f"K-FAC fisher_type='mc': {where} does not require grad (computed under "
                "torch.no_grad() or detached?); the sampled loss cannot be differentiated."
            )
        return output

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
            pending, self._pending_rng = self._pending_rng, None
            if pending is not None and pending.get("device") == device.type:
                self.generator.set_state(pending["state"])
        return self.generator

    def _sample(self, f: Tensor) -> Tensor:
        """``S`` label draws ``y~ ~ p(y|f)``, stacked on a leading dimension of size S."""
        gen = self._generator(f.device)
        if self._rng_mark is None:  # the step's first draw: where an aborted step rewinds to
            self._rng_mark = {"device": gen.device.type, "state": gen.get_state()}
        with torch.no_grad():
            # Non-finite outputs are sanitized for sampling only: the NLL below still sees them,
            # so G becomes non-finite and the engine's non-finite policy skips that update.
            x = torch.nan_to_num(f.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
            S = self.samples
            if self.likelihood == "categorical":
                probs = torch.softmax(x.reshape(-1, x.shape[-1]), dim=-1)
                draws = torch.multinomial(probs, S, replacement=True, generator=gen)  # R x S
                return draws.T.contiguous()
            if self.likelihood == "bernoulli":
                p = torch.sigmoid(x).expand(S, *x.shape)
                return torch.bernoulli(p, generator=gen)
            noise = torch.randn((S, *x.shape), generator=gen, device=x.device, dtype=x.dtype)
            return x + math.sqrt(self.variance) * noise

    def _enumerate(self, f: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every class c with per-row weights ``sqrt(C p(c|f_n))`` (see ``backward``)."""
        if self.likelihood != "categorical":
            raise ValueError(
                f"Invalid likelihood={self.likelihood!r} for enumerate_classes=True: "
                "only 'categorical' can be enumerated."
            )
        logits = f.detach().reshape(-1, f.shape[-1])
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
        classes = probs.shape[1]
        return [
            (
                torch.full((probs.shape[0],), c, dtype=torch.long, device=f.device),
                (classes * probs[:, c]).sqrt(),
            )
            for c in range(classes)
        ]

    def nll(self, f: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
        """``sum over every row (and feature) of -log p(y|f)``, up to a constant.

        ``weight`` (categorical only): per-row multipliers of the terms (``enumerate_classes``).
        """
        if f.dtype in (torch.float16, torch.bfloat16):
            f = f.float()
        if self.likelihood == "categorical":
            terms = F.cross_entropy(f.reshape(-1, f.shape[-1]), y, reduction="none")
            return (terms if weight is None else terms * weight.to(terms.dtype)).sum()
        if self.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(f, y.to(f.dtype), reduction="sum")
        return (f - y.to(f.dtype)).square().sum() / (2.0 * self.variance)

    def loss_terms(self, f: Tensor) -> int | None:
        """How many terms the user's loss averages over for an output ``f`` (None: a sum).

        The sampled loss stands for the user's loss, reduced the way PyTorch's losses reduce with
        ``reduction="mean"`` (``loss_reduction="mean"``): ``cross_entropy`` (categorical) over
        every position of ``f`` but the class dimension; ``binary_cross_entropy_with_logits`` and
        ``mse_loss`` (bernoulli, gaussian) over every element (``output_reduction="mean"``) or,
        with ``output_reduction="sum"``, over every position but the last dimension, whose
        features are summed. Each layer's ``g`` is then scaled as the empirical Fisher scales the
        user's gradient (times the layer's examples), so a loss averaged over C outputs per
        example makes both Fisher types' G smaller by C^2.
        """
        if not self.loss_mean:
            return None
        numel = f.numel()
        if self.likelihood == "categorical" or (self.output_reduction == "sum" and f.dim() >= 2):
            return numel // max(f.shape[-1], 1)
        return numel

    def step_start_rng(self) -> dict[str, Any] | None:
        """The sampling generator's state before the current step's first draw (None: unused)."""
        if self._rng_mark is not None:
            return self._rng_mark
        if self.generator is not None:
            return {"device": self.generator.device.type, "state": self.generator.get_state()}
        return self._pending_rng

    def rewind(self, rng: dict[str, Any] | None) -> None:
        """Put the sampling generator back to ``rng`` (from ``step_start_rng``)."""
        self._rng_mark = None
        if rng is None and self.generator is None:
            return
        self.generator = None
        self._pending_rng = rng

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"seed": self.seed}
        if self.generator is not None:
            state["rng"] = {
                "device": self.generator.device.type,
                "state": self.generator.get_state(),
            }
        elif self._pending_rng is not None:
            state["rng"] = self._pending_rng
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))
        self.generator = None
        self._pending_rng = state.get("rng")
