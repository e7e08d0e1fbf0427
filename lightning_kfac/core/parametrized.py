"""Parametrized weights: detected without evaluating them, skipped with the reason.

``torch.nn.utils.parametrize`` (and ``torch.nn.utils.parametrizations.weight_norm`` /
``spectral_norm`` / ``orthogonal``) turns ``module.weight`` into a property: every read runs the
parametrization (spectral_norm: a power iteration that updates its ``u``/``v`` buffers in
training mode, so an extra read changes training). The legacy hook-based
``torch.nn.utils.weight_norm`` / ``spectral_norm`` recompute a plain ``weight`` tensor from
``weight_g``/``weight_v`` (``weight_orig``) in a forward pre-hook.

Either way the trained parameters are not the weight K-FAC's factors describe: ``A (x) G``
approximates the Fisher of the evaluated ``W`` (Martens & Grosse 2015, sec. 3), while the optimizer
steps ``original`` (or ``g, v``), whose gradient is ``J^T grad W`` for the parametrization's
Jacobian ``J``. Preconditioning it would need ``J`` per step, so such layers are skipped, with
this reason, and nothing here reads ``module.weight`` of a parametrized module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from torch import nn
from torch.nn.utils import parametrize

_LEGACY_HOOKS = {
    "WeightNorm": "torch.nn.utils.weight_norm",
    "SpectralNorm": "torch.nn.utils.spectral_norm",
}


def _legacy_hooks(module: nn.Module) -> list[str]:
    """Names of the legacy weight_norm / spectral_norm forward pre-hooks on ``module``."""
    found = []
    for hook in module._forward_pre_hooks.values():
        label = _LEGACY_HOOKS.get(type(hook).__name__)
        if label is not None:
            found.append(label)
    return found


def _parametrizations(module: nn.Module) -> Mapping[str, parametrize.ParametrizationList]:
    """``module.parametrizations`` (a ModuleDict of ParametrizationList), typed."""
    return cast("Mapping[str, parametrize.ParametrizationList]", module.parametrizations)


def parametrization_reason(module: nn.Module) -> str:
    """Why ``module``'s weight cannot be preconditioned as a plain parameter; "" when it can."""
    if parametrize.is_parametrized(module):
        lists = _parametrizations(module)
        tensors = list(lists.keys())
        kinds = sorted({type(p).__name__ for name in tensors for p in lists[name]})
        originals = [
            f"{name}.{p}"
            for name in tensors
            for p, _ in lists[name].named_parameters(recurse=False)
        ]
        return (
            f"parametrized {', '.join(tensors)} ({', '.join(kinds)}, torch.nn.utils."
            f"parametrize): the optimizer steps {', '.join(originals) or 'its originals'}, "
            "not the weight K-FAC's factors describe"
        )
    legacy = _legacy_hooks(module)
    if legacy:
        params = ", ".join(sorted(module._parameters))
        return (
            f"weight recomputed by {', '.join(legacy)} from {params}: the optimizer steps "
            "those, not the weight K-FAC's factors describe; use no weight reparametrization "
            "on this layer to precondition it"
        )
    return ""


def is_parametrization_container(module: nn.Module) -> bool:
    """The ``ParametrizationList`` holding ``original``: its parameters belong to its owner."""
    return isinstance(module, parametrize.ParametrizationList)


def own_trainable(module: nn.Module) -> int:
    """Trainable parameters held directly by ``module``, its parametrizations' originals included
    (read from the containers: no parametrization is evaluated)."""
    params = list(module.parameters(recurse=False))
    if parametrize.is_parametrized(module):
        params += list(cast(nn.Module, module.parametrizations).parameters())
    return sum(p.numel() for p in params if p.requires_grad)
