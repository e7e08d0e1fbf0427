"""KFACPreconditioner: the Lightning-free K-FAC engine (Martens & Grosse 2015).

Usage in a plain PyTorch loop::

    pre = KFACPreconditioner(model, damping=1e-3)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        pre.step(optimizer)     # replaces weight.grad / bias.grad by (F + damping I)^-1 grad
        optimizer.step()

At optimizer step t (0-based): factors are updated when ``t % factor_update_steps == 0``,
decompositions recomputed when ``t % inv_update_steps == 0``, in that order, then the gradient is
preconditioned with the decompositions in use and KL-clipped (CONTRACT.md, "Clocks").
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from lightning_kfac.config import KFACConfig
from lightning_kfac.core import linalg
from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.capture import Capture
from lightning_kfac.core.discovery import discover
from lightning_kfac.core.distributed import Communicator, default_communicator
from lightning_kfac.summary import format_summary

_COUNTERS = ("factor_updates", "decompositions", "nonfinite_estimates", "nonfinite_gradients",
             "decomposition_failures", "dropped_layers")
STATE_VERSION = 1


def _unwrap(model: nn.Module) -> nn.Module:
    wrapped = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrapped):
        model = model.module
    return model


class KFACPreconditioner:
    """K-FAC for a ``torch.nn.Module``: capture hooks, running factors, damped preconditioning.

    Args:
        model: the model whose Linear / Conv1d / Conv2d / Conv3d layers are preconditioned.
        config: a ``KFACConfig`` or a mapping of its options; keywords override it.
        optimizer: default optimizer for ``step()`` (lr for the KL clip, which params to touch).
        communicator: collectives across ranks; by default torch.distributed when initialized.
        **options: any ``KFACConfig`` option (``damping=1e-2``, ``compute_method="inverse"``...).
    """

    def __init__(self, model: nn.Module, config: Any = None, *,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 communicator: Optional[Communicator] = None, **options: Any):
        self.config = KFACConfig.from_any(config, **options)
        self.model = _unwrap(model)
        self.blocks, self.skipped = discover(self.model, self.config)
        self.comm = communicator if communicator is not None else default_communicator()
        self.capture = Capture(self.blocks, mean_reduction=self.config.loss_reduction == "mean")
        self.capture.install()
        self.optimizer = optimizer
        self.steps = 0
        self.counters: Dict[str, int] = {k: 0 for k in _COUNTERS}
        self.last_stats: Dict[str, float] = {}
        self._warned: set = set()
        self._set_capture()

    # -- public API ------------------------------------------------------------------------------
    @property
    def layers(self) -> Dict[str, KFACBlock]:
        """Qualified module name -> block, for every preconditioned layer."""
        return self.blocks

    @property
    def grad_scale(self) -> float:
        """What the loss was multiplied by before the current backward (AMP scale x 1/k)."""
        return self.capture.grad_scale

    @grad_scale.setter
    def grad_scale(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"Invalid grad_scale={value!r}: must be a finite number > 0.")
        self.capture.grad_scale = value

    def set_step(self, step: int) -> None:
        """Set the optimizer-step clock t (e.g. ``trainer.global_step``); switches capture."""
        self.steps = int(step)
        self._set_capture()

    def step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Update factors / decompositions on their clocks, then precondition the gradients."""
        start = time.perf_counter()
        optimizer = optimizer if optimizer is not None else self.optimizer
        t = self.steps
        self._update_factors([b for b in self.blocks.values() if t % b.factor_update_steps == 0])
        self._update_decompositions([b for b in self.blocks.values()
                                     if t % b.inv_update_steps == 0 and b.A is not None])
        if t >= self.config.warmup_steps:
            self._precondition(optimizer)
        else:
            self.last_stats = {"kl_clip_factor": 1.0, "grad_norm_ratio": 1.0}
        self.steps = t + 1
        self._set_capture()
        self.last_stats["time_ms"] = 1e3 * (time.perf_counter() - start)
        self.last_stats["layers"] = float(len(self.blocks))
        self.last_stats["damping"] = self.config.damping

    def factors(self) -> Dict[str, Tuple[Tensor, Tensor]]:
        """Name -> ``(A, G)``: detached copies of the running factors of every updated layer."""
        return {name: (b.A.detach().clone(), b.G.detach().clone())
                for name, b in self.blocks.items() if b.A is not None}

    def remove(self) -> None:
        """Take every hook off the model (the factors stay available)."""
        self.capture.remove()

    def wrap(self, optimizer: torch.optim.Optimizer) -> "KFACOptimizer":
        """An optimizer-like object whose ``step()`` preconditions, then steps ``optimizer``."""
        self.optimizer = optimizer
        return KFACOptimizer(self, optimizer)

    def summary(self) -> str:
        """Registration summary: covered modules, skipped modules and why, parameter share."""
        return format_summary(self.model, self.blocks, self.skipped)

    def memory_bytes(self) -> int:
        """Bytes held by running factors and decompositions."""
        return sum(b.memory_bytes() for b in self.blocks.values())

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything a bit-identical resume needs; tensors and Python primitives only."""
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "counters": dict(self.counters),
            "config": self.config.to_dict(),
            "layers": {name: b.state_dict() for name, b in self.blocks.items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a ``state_dict``; every saved layer must exist here (no silent partial load)."""
        layers = state.get("layers", {})
        missing = sorted(set(layers) - set(self.blocks))
        if missing:
            raise ValueError(
                f"K-FAC state has layers {missing} that this model does not precondition "
                f"(preconditioned here: {sorted(self.blocks)}). Was the checkpoint made with "
                "another model or other skip_layers?")
        self.steps = int(state.get("steps", 0))
        self.counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
        for name, block_state in layers.items():
            self.blocks[name].load_state_dict(block_state)
        self._set_capture()

    # -- internals -------------------------------------------------------------------------------
    def _set_capture(self) -> None:
        for block in self.blocks.values():
            block.capturing = self.steps % block.factor_update_steps == 0

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _update_factors(self, due: List[KFACBlock]) -> None:
        """Batch estimates -> all-reduce (one flattened call) -> running averages."""
        if not due:
            return
        estimates: List[Tensor] = []
        flags = torch.zeros(2 * len(due), dtype=torch.float64)
        for i, block in enumerate(due):
            a_hat, g_hat = block.batch_estimates()
            seen = block.has_estimates()
            finite = seen and bool(torch.isfinite(a_hat).all() and torch.isfinite(g_hat).all())
            if seen and not finite:
                a_hat, g_hat = torch.zeros_like(a_hat), torch.zeros_like(g_hat)
            flags[2 * i], flags[2 * i + 1] = float(seen), float(finite)
            estimates += [a_hat, g_hat]
            block.reset_accumulators()
        world = self.comm.world_size
        if world > 1:
            self.comm.all_reduce_sum_([flags] + estimates)
        dropped = []
        for i, block in enumerate(due):
            seen, finite = int(flags[2 * i]), int(flags[2 * i + 1])
            a_hat, g_hat = estimates[2 * i], estimates[2 * i + 1]
            if seen == 0:
                if block.A is None:
                    dropped.append(block.name)
                continue
            if finite < world:
                self.counters["nonfinite_estimates"] += 1
                message = (f"K-FAC: non-finite factor estimate for layer {block.name!r} at step "
                           f"{self.steps}; this factor update is skipped (running factors kept).")
                if self.config.nonfinite == "raise":
                    raise FloatingPointError(message)
                self._warn_once(f"nonfinite-est:{block.name}", message)
                continue
            if world > 1:
                a_hat.div_(world)
                g_hat.div_(world)
            block.update_factors(a_hat, g_hat, self.config.factor_decay)
            self.counters["factor_updates"] += 1
        if dropped:
            self._drop(dropped)

    def _drop(self, names: List[str]) -> None:
        """Forget layers whose hooks never fired in a training forward (e.g. MHA's out_proj)."""
        self.capture.remove(names)
        for name in names:
            block = self.blocks.pop(name)
            self.skipped.append(_skipped_unseen(block))
        self.counters["dropped_layers"] += len(names)
        warnings.warn(
            f"K-FAC: layers {names} were registered but never ran in a training forward "
            "(their weights may be used functionally, e.g. MultiheadAttention.out_proj); "
            "they are not preconditioned.", RuntimeWarning, stacklevel=3)

    def _decompose(self, block: KFACBlock) -> Dict[str, Tensor]:
        method = block.compute_method
        if method == "eigen":
            dec = linalg.eigen_decomposition(block.A, block.G)
        elif method == "inverse":
            dec = linalg.inverse_decomposition(block.A, block.G, self._damping(block))
        else:
            raise NotImplementedError(f"compute_method={method!r} is not implemented yet")
        if self.config.damping_mode == "relative":
            scale = linalg.mean_eigenvalue(block.A) * linalg.mean_eigenvalue(block.G)
            dec["damping_scale"] = torch.tensor(scale, dtype=torch.float64)
        return dec

    def _damping(self, block: KFACBlock) -> float:
        """Absolute damping of a block (relative mode: times (tr A/dim A)(tr G/dim G))."""
        if self.config.damping_mode != "relative":
            return block.damping
        scale = linalg.mean_eigenvalue(block.A) * linalg.mean_eigenvalue(block.G)
        return block.damping * scale if scale > 0 else block.damping

    def _update_decompositions(self, due: List[KFACBlock]) -> None:
        for block in due:
            try:
                block.decomposition = self._decompose(block)
                block.failures = 0
                self.counters["decompositions"] += 1
            except linalg.DecompositionError as err:
                block.failures += 1
                self.counters["decomposition_failures"] += 1
                if block.failures >= self.config.max_decomposition_failures:
                    raise RuntimeError(
                        f"K-FAC: the decomposition of layer {block.name!r} failed "
                        f"{block.failures} times in a row ({err}). Try a larger damping "
                        f"(now {block.damping:g}, e.g. {block.damping * 10:g}) or skip the "
                        "layer with skip_layers.") from err
                self._warn_once(f"decomp:{block.name}",
                                f"K-FAC: decomposition of layer {block.name!r} failed ({err}); "
                                "keeping the previous one.")

    def _precondition_block(self, block: KFACBlock, grad: Tensor) -> Tensor:
        dec = block.decomposition
        if block.compute_method == "eigen":
            damping = block.damping
            if "damping_scale" in dec and float(dec["damping_scale"]) > 0:
                damping = damping * float(dec["damping_scale"])
            return linalg.precondition_eigen(grad, dec, damping)
        return linalg.precondition_inverse(grad, dec)

    def _precondition(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        lr_of: Optional[Dict[int, float]] = None
        if optimizer is not None:
            lr_of = {id(p): float(group.get("lr", 1.0))
                     for group in optimizer.param_groups for p in group["params"]}
        work = []
        for block in self.blocks.values():
            weight = block.kind.module.weight
            if not block.decomposition or (lr_of is not None and id(weight) not in lr_of):
                continue
            raw = block.kind.grad_matrix()
            if raw is None:
                continue
            grad = raw.to(block.dtype)
            work.append((block, grad, self._precondition_block(block, grad),
                         1.0 if lr_of is None else lr_of[id(weight)]))
        if not work:
            self.last_stats = {"kl_clip_factor": 1.0, "grad_norm_ratio": 1.0}
            return
        finite = torch.stack([torch.isfinite(p).all() for _, _, p, _ in work]).tolist()
        vg_sum, raw_sq, pre_sq = 0.0, 0.0, 0.0
        for (block, grad, pre, lr), ok in zip(work, finite):
            if ok:
                vg_sum += float((pre * grad).sum()) * lr * lr
        nu = 1.0
        if self.config.kl_clip is not None and vg_sum != 0.0:
            nu = min(1.0, math.sqrt(self.config.kl_clip / abs(vg_sum)))
        for (block, grad, pre, lr), ok in zip(work, finite):
            if not ok:
                self.counters["nonfinite_gradients"] += 1
                message = (f"K-FAC: non-finite preconditioned gradient for layer {block.name!r} "
                           f"at step {self.steps}; the raw gradient is used for this step.")
                if self.config.nonfinite == "raise":
                    raise FloatingPointError(message)
                self._warn_once(f"nonfinite-grad:{block.name}", message)
                continue
            if nu != 1.0:
                pre = pre * nu
            raw_sq += float(grad.square().sum())
            pre_sq += float(pre.square().sum())
            block.kind.set_grad(pre.to(block.kind.module.weight.grad.dtype))
        ratio = math.sqrt(pre_sq / raw_sq) if raw_sq > 0 else 1.0
        self.last_stats = {"kl_clip_factor": nu, "grad_norm_ratio": ratio}


def _skipped_unseen(block: KFACBlock):
    from lightning_kfac.core.discovery import Skipped

    module = block.kind.module
    n = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
    return Skipped(block.name, type(module).__name__, "never ran in a training forward", n)


class KFACOptimizer:
    """Optimizer wrapper for plain PyTorch: ``step()`` preconditions, then steps the inner one.

    Example:
        >>> opt = KFACPreconditioner(model).wrap(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, preconditioner: KFACPreconditioner, optimizer: torch.optim.Optimizer):
        self.preconditioner = preconditioner
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Invalid closure: KFACOptimizer needs the gradients before step(); "
                             "call loss.backward() first and step() without a closure.")
        self.preconditioner.step(self.optimizer)
        return self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "kfac": self.preconditioner.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.preconditioner.load_state_dict(state["kfac"])
