"""Which modules are preconditioned: supported type, trainable weight, not skipped.

A weight held by several supported modules (tied weights) is one block fed by all of them
(core/sharing.py). Every module that owns trainable parameters but is not preconditioned is
listed with the reason (unsupported type, matched ``skip_layers``, a weight also held by an
unsupported module, a parametrized weight), for the registration summary. Frozen layers are
registered as frozen-for-now (core/trainability.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_kfac.config import KFACConfig
from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.layers import MHA_REASON, make_kind, registered_kind
from lightning_kfac.core.methods import method_for
from lightning_kfac.core.parametrized import (
    is_parametrization_container,
    own_trainable,
    parametrization_reason,
)
from lightning_kfac.core.sharing import share


@dataclass
class Skipped:
    """A module with trainable parameters that K-FAC leaves alone, and why."""

    name: str
    type_name: str
    reason: str
    num_params: int


def _own_trainable(module: nn.Module) -> int:
    return own_trainable(module)  # parametrizations' originals included (core/parametrized.py)


def _matches(patterns: list[str], name: str, type_name: str) -> str:
    for pattern in patterns:
        if re.search(pattern, name) or re.search(pattern, type_name):
            return pattern
    return ""


def layer_settings(config: KFACConfig, name: str, type_name: str) -> dict[str, Any]:
    """Per-layer damping / clocks / method after applying ``layer_overrides`` in order."""
    settings = {
        "damping": config.damping,
        "factor_update_steps": config.factor_update_steps,
        "inv_update_steps": config.inv_update_steps,
        "compute_method": str(config.compute_method),
    }
    for override in config.layer_overrides:
        if re.search(override["regex"], name) or re.search(override["regex"], type_name):
            settings.update({k: v for k, v in override.items() if k != "regex"})
    return settings


def _param_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(trainable parameter) -> names of the modules that hold it directly."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(name)
    return owners


def factor_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32, or the weight's dtype when it is wider (float64 models keep float64 factors)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _refuse_all(
    skipped: list[Skipped], holders: Iterable[tuple[str, nn.Module, Any]], reason: str
) -> None:
    for name, module, _ in holders:
        if _own_trainable(module):  # frozen-for-now holders are not listed
            skipped.append(Skipped(name, type(module).__name__, reason, _own_trainable(module)))


def discover(model: nn.Module, config: KFACConfig) -> tuple[dict[str, KFACBlock], list[Skipped]]:
    """Blocks for the preconditioned modules (in ``named_modules`` order) and the skipped list.

    A weight held by several supported modules (tied weights) is one block named after its
    first holder, fed by every holder (core/sharing.py).
    """
    blocks: dict[str, KFACBlock] = {}
    skipped: list[Skipped] = []
    owners = _param_owners(model)
    by_weight: dict[int, list[tuple[str, nn.Module, Any]]] = {}
    functional = {
        id(m.out_proj): name
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }  # used through F.*, never called
    for name, module in model.named_modules():
        if is_parametrization_container(module):
            continue  # its ``original`` parameters are counted (and listed) with their owner
        trainable = _own_trainable(module)
        kind, reason = make_kind(module)
        if kind is not None and parametrization_reason(module):  # never evaluate it
            kind, reason = None, parametrization_reason(module)
        if id(module) in functional and kind is not None and registered_kind(module) is None:
            kind, reason = (
                None,
                (
                    f"output projection of MultiheadAttention "
                    f"{functional[id(module)]!r}: {MHA_REASON}"
                ),
            )
        if kind is None:
            if trainable:
                skipped.append(Skipped(name, type(module).__name__, reason, trainable))
            continue
        # A frozen weight is registered too ("frozen (for now)" in the summary): it is neither
        # captured nor preconditioned until trainable and in the optimizer again (Lightning's
        # BackboneFinetuning, requires_grad_(True) mid-fit; core/trainability.py).
        by_weight.setdefault(id(kind.weight), []).append((name, module, kind))
    for holders in by_weight.values():
        name, module, kind = holders[0]
        type_name = type(module).__name__
        names = [h[0] for h in holders]
        shared = len(holders) > 1
        what = f" (its weight is shared with {names[1:]})" if shared else ""
        pattern = next(
            (
                p
                for p in (_matches(config.skip_layers, n, type(m).__name__) for n, m, _ in holders)
                if p
            ),
            "",
        )
        if pattern:
            _refuse_all(skipped, holders, f"matched skip_layers {pattern!r}{what}")
            continue
        settings = layer_settings(config, name, type_name)
        if settings["compute_method"] == "skip":
            _refuse_all(skipped, holders, f"layer_overrides: compute_method=skip{what}")
            continue
        if shared:
            kind, reason = share(holders)  # decides whether the holders' bias enters W~
            if kind is None:
                _refuse_all(skipped, holders, f"shared weight: {reason}")
                continue
        tied = sorted(
            {
                o
                for _, m, k in holders
                for p in _checked_params(m, k, shared)
                for o in owners.get(id(p), ())
            }
            - set(names)
        )
        if tied:
            reason = (
                f"parameters tied to {', '.join(map(repr, tied))}: tied weights are only "
                "preconditioned when every holder is a supported layer"
            )
            _refuse_all(skipped, holders, reason)
            continue
        unsupported = _ekfac_unsupported(kind, shared)
        method = settings["compute_method"]
        if unsupported and method_for(method).needs_pairs:
            _refuse_all(
                skipped,
                holders,
                f"compute_method={method!r} does not support "
                f"{unsupported} (use 'eigen' for this layer through layer_overrides)",
            )
            continue
        if shared:
            for holder_name, holder, _ in holders:
                bias = getattr(holder, "bias", None)
                if not kind.has_bias and isinstance(bias, torch.Tensor) and bias.requires_grad:
                    skipped.append(
                        Skipped(
                            holder_name,
                            type(holder).__name__,
                            "bias of a shared-weight layer (raw gradient)",
                            bias.numel(),
                        )
                    )
        settings.setdefault("max_dense_dim", config.max_dense_dim)  # layer_overrides may set it
        blocks[name] = KFACBlock(name, kind, factor_dtype(kind.weight), **settings)
    return blocks, skipped


def _ekfac_unsupported(kind: Any, shared: bool) -> str:
    """What EKFAC's per-example scaling cannot handle here ("" when it can)."""
    if shared:
        return "shared weights"
    if kind.groups > 1:
        return "grouped convolutions"
    if kind.diagonal_a and getattr(kind.module, "padding_idx", None) is not None:
        return "nn.Embedding(padding_idx=...)"  # its scaling would count the padding positions
    return ""


def _checked_params(module: nn.Module, kind: Any, shared: bool) -> list[torch.Tensor]:
    """Parameters whose other holders must be this weight's holders: the weight, and the bias
    when it enters W~ (a shared weight's holders keep unshared biases raw)."""
    params = [kind.weight]
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and (kind.has_bias or not shared):
        params.append(bias)
    return [p for p in params if p.requires_grad]
