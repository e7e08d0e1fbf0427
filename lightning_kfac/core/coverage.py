"""Never silently off: warnings about what K-FAC does not precondition, and why.

Three Python warnings (category ``KFACCoverageWarning``, a ``UserWarning``), from the engine
itself so that a plain PyTorch loop gets them as well as the Lightning callback:

- at registration, one warning grouping every skipped module that holds trainable parameters by
  its reason (modules the user skipped on purpose, ``skip_layers`` or ``compute_method=skip``,
  are left out of it: they are listed in the summary only);
- at registration, when fewer than half of the trainable parameters are preconditioned, one
  warning naming the largest skipped modules, their reasons and the fixes;
- during training, for a registered layer that is still not preconditioned at the end of its
  first decomposition interval (or dropped because its hooks never fired), the real cause: the
  model was compiled with ``torch.compile`` before the hooks were attached (compiled code keeps
  the hooks it was traced with), the weight is used functionally (read by its parent without
  calling the module, e.g. ``nn.MultiheadAttention.out_proj``), a parametrization, no training
  forward at all, or no output gradient.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn
from torch.nn.utils import parametrize

from lightning_kfac.core.parametrized import parametrization_reason

if TYPE_CHECKING:
    from lightning_kfac.core.blocks import KFACBlock
    from lightning_kfac.core.discovery import Skipped

COVERAGE_WARNING_SHARE = 0.5  # below this share of trainable parameters: the coverage warning
_USER_CHOICES = ("matched skip_layers", "layer_overrides: compute_method=skip")
_COMPILE_FIX = (
    "compile after K-FAC attached its hooks (after KFACPreconditioner(model), or in "
    "the LightningModule's on_fit_start, which runs after the callbacks'), or never "
    "call the compiled model before; see docs/compile.md"
)


class KFACCoverageWarning(RuntimeWarning):
    """Part of the model's trainable parameters is not preconditioned by K-FAC."""


def _names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n or "<root>") for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def trainable_total(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def covered_params(blocks: Mapping[str, KFACBlock]) -> int:
    """Trainable parameters of the registered layers, each tensor once (frozen-for-now layers
    count 0)."""
    unique = {id(p): p for b in blocks.values() for p in b.kind.params if p.requires_grad}
    return sum(p.numel() for p in unique.values())


def coverage(model: nn.Module, blocks: Mapping[str, KFACBlock]) -> dict[str, float]:
    """``{"covered", "trainable", "share"}``: preconditioned / trainable parameters now."""
    total, covered = trainable_total(model), covered_params(blocks)
    return {"covered": covered, "trainable": total, "share": covered / total if total else 0.0}


def _unique_trainable(
    model: nn.Module, names: Iterable[str], covered: frozenset[int] = frozenset()
) -> int:
    """Trainable parameters held by the named modules, each tensor once (tied weights), leaving
    out those in ``covered`` (ids of preconditioned tensors: a shared weight whose holder keeps
    only its bias raw counts the bias alone)."""
    modules = dict(model.named_modules())
    unique = {}
    for name in names:
        module = modules.get(name)
        if module is None:
            continue
        params = list(module.parameters(recurse=False))
        if parametrize.is_parametrized(module):
            params += list(module.parametrizations.parameters())
        unique.update({id(p): p for p in params if p.requires_grad and id(p) not in covered})
    return sum(p.numel() for p in unique.values())


def skipped_message(
    model: nn.Module, skipped: Iterable[Skipped], total: int, covered: frozenset[int] = frozenset()
) -> str | None:
    """One message for every involuntarily skipped module with trainable parameters, by reason."""
    by_reason: dict[str, list[Skipped]] = {}
    for s in skipped:
        if s.num_params and not s.reason.startswith(_USER_CHOICES):
            by_reason.setdefault(s.reason, []).append(s)
    if not by_reason:
        return None
    count = sum(len(v) for v in by_reason.values())
    params = _unique_trainable(model, [s.name for v in by_reason.values() for s in v], covered)
    share = 100.0 * params / total if total else 0.0
    lines = [
        f"K-FAC does not precondition {count} module(s) holding {params:,} trainable "
        f"parameters ({share:.1f}% of the model's); they keep their raw gradient:"
    ]
    sizes = {
        reason: _unique_trainable(model, [s.name for s in group], covered)
        for reason, group in by_reason.items()
    }
    for reason, group in sorted(by_reason.items(), key=lambda kv: -sizes[kv[0]]):
        lines.append(
            f"  {len(group)} x {group[0].type_name} ({sizes[reason]:,} params: "
            f"{_names([s.name for s in group])}): {reason}"
        )
    return "\n".join(lines)


def coverage_message(total: int, covered: int, skipped: Iterable[Skipped]) -> str | None:
    """The low-coverage message (below ``COVERAGE_WARNING_SHARE``), or None."""
    if total <= 0 or covered >= COVERAGE_WARNING_SHARE * total:
        return None
    largest = sorted((s for s in skipped if s.num_params), key=lambda s: -s.num_params)[:3]
    lines = [
        f"K-FAC preconditions only {100.0 * covered / total:.1f}% of the trainable "
        f"parameters ({covered:,} of {total:,}); the largest modules it skips:"
    ]
    for s in largest:
        lines.append(f"  {s.name or '<root>'} ({s.type_name}, {s.num_params:,} params): {s.reason}")
    lines.append(
        "Fix: use supported layer types (nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, "
        "transformers' Conv1D) or add the skipped type with lightning_kfac.register_layer "
        "(docs/layers.md), relax skip_layers / layer_overrides, unparametrize the "
        "weights named above; or accept a partial K-FAC and "
        "silence this with warnings.filterwarnings('ignore', "
        "category=KFACCoverageWarning)."
    )
    return "\n".join(lines)


def registration_messages(
    model: nn.Module, blocks: Mapping[str, KFACBlock], skipped: Sequence[Skipped]
) -> list[str]:
    """The registration warnings (skipped modules, low coverage), possibly none."""
    total = trainable_total(model)
    covered = frozenset(id(p) for b in blocks.values() for p in b.kind.params)
    found = [
        skipped_message(model, skipped, total, covered),
        coverage_message(total, covered_params(blocks), skipped),
    ]
    return [m for m in found if m]


# -- why a registered layer is not preconditioned --------------------------------------------------
def _compiled_marks(module: nn.Module) -> list[str]:
    """How ``module`` itself is compiled: in place (``module.compile()``) or Lightning's
    ``trainer.fit(torch.compile(model))``."""
    marks = []
    if getattr(module, "_compiled_call_impl", None) is not None:
        marks.append("module.compile()")
    if getattr(module, "_compiler_ctx", None):
        marks.append("torch.compile (Lightning)")
    return marks


def _optimized_wrappers() -> dict[int, str]:
    """id(module) -> "torch.compile" for every module wrapped by a live ``OptimizedModule``."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return {}
    found = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), OptimizedModule):  # type(): weak proxies fail isinstance
            inner = obj.__dict__.get("_modules", {}).get("_orig_mod")
            if inner is not None:
                found[id(inner)] = "torch.compile(module)"
    return found


def compiled_path(model: nn.Module, name: str, wrappers: dict[int, str] | None = None) -> list[str]:
    """The modules from ``model`` down to ``name`` (either included) that are compiled."""
    wrappers = _optimized_wrappers() if wrappers is None else wrappers
    modules = dict(model.named_modules())
    path, parts = [""], name.split(".") if name else []
    for i in range(len(parts)):
        path.append(".".join(parts[: i + 1]))
    found = []
    for prefix in path:
        module = modules.get(prefix)
        if module is None:
            continue
        marks = _compiled_marks(module)
        if id(module) in wrappers:
            marks.append(wrappers[id(module)])
        if type(module).__name__ == "OptimizedModule":
            marks.append("torch.compile(module) inside the model")
        if marks:
            found.append(f"{prefix or '<root>'} ({', '.join(marks)})")
    return found


def unpreconditioned_cause(
    model: nn.Module, block: KFACBlock, wrappers: dict[int, str] | None = None
) -> str:
    """The most likely reason why ``block`` has not been preconditioned yet (``wrappers``: a
    precomputed ``_optimized_wrappers()``, a scan of every live object)."""
    module = block.kind.module
    reason = parametrization_reason(module)
    if reason:
        return f"parametrized after K-FAC registered it: {reason}"
    if block.seen:
        return (
            "its forward ran but no gradient of the loss reached its output (an output "
            "detached, or not used by the loss)"
        )
    compiled = compiled_path(model, block.name, wrappers)
    if compiled:
        return (
            f"its hooks never fired: compiled with torch.compile before K-FAC attached its "
            f"hooks ({'; '.join(compiled)}), and compiled code keeps the hooks it was "
            f"traced with. Fix: {_COMPILE_FIX}"
        )
    weight = block.kind.weight
    if weight.grad is not None:
        parent_name = block.name.rsplit(".", 1)[0] if "." in block.name else ""
        parent = dict(model.named_modules()).get(parent_name)
        owner = (
            f"its parent {type(parent).__name__} ({parent_name or '<root>'!r})"
            if parent is not None and parent is not module
            else "another module"
        )
        return (
            f"functional use: its weight gets gradients but the module is never called; "
            f"{owner} reads the weight directly (as nn.MultiheadAttention does with "
            "out_proj)"
        )
    return (
        "it never ran in a training forward (an unused branch, a module run in eval mode or "
        "under torch.no_grad)"
    )


class FirstIntervalCheck:
    """Warn once per layer still without factors at the end of its first decomposition interval.

    A layer's interval starts at the first step it is active (trainable and stepped by the
    optimizer) and lasts ``max(inv_update_steps, factor_update_steps)`` steps. A layer with
    factors is decomposed in the step they first arrive (or at its refresh step), so "no factors"
    is what "not preconditioned" means here; it is the same on every rank (factors are
    all-reduced; under ``distribute="gradients"`` a rank holds only its own decompositions).
    Failed decompositions are warned about on their own.
    """

    def __init__(self) -> None:
        self._since: dict[str, int] = {}
        self._warned: set[str] = set()

    def late(self, t: int, active: Iterable[KFACBlock], warmup_steps: int) -> list[KFACBlock]:
        due: list[KFACBlock] = []
        for block in active:
            start = self._since.setdefault(block.name, t)
            if block.name in self._warned or block.A is not None:
                continue  # has factors: decomposed now or at its refresh (failures warn apart)
            interval = max(block.inv_update_steps, block.factor_update_steps)
            if t >= max(start + interval - 1, warmup_steps):
                self._warned.add(block.name)
                due.append(block)
        return due


def _by_cause(model: nn.Module, blocks: Sequence[KFACBlock]) -> list[str]:
    """One line per distinct cause, naming its layers."""
    groups: dict[str, list[str]] = {}
    wrappers = _optimized_wrappers()  # one scan of the live objects for all the layers
    for block in blocks:
        groups.setdefault(unpreconditioned_cause(model, block, wrappers), []).append(block.name)
    return [f"  {_names(names, limit=6)}: {cause}" for cause, names in groups.items()]


def late_message(model: nn.Module, blocks: Sequence[KFACBlock], t: int) -> str:
    lines = [
        f"K-FAC: {len(blocks)} registered layer(s) not preconditioned by the end of their "
        f"first decomposition interval (step {t}); they keep their raw gradient:"
    ]
    return "\n".join(lines + _by_cause(model, blocks))


def dropped_message(model: nn.Module, blocks: Sequence[KFACBlock]) -> str:
    names = [b.name for b in blocks]
    lines = [
        f"K-FAC: layers {names} were registered but never ran in a training forward "
        "through their hooks; they are not preconditioned:"
    ]
    return "\n".join(lines + _by_cause(model, blocks))
