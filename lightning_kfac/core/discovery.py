"""Which modules are preconditioned: supported type, trainable weight, not skipped, not tied.

Every module that owns trainable parameters but is not preconditioned is listed with the
reason (unsupported type, frozen, matched ``skip_layers``, tied weight), for the registration
summary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from lightning_kfac.config import KFACConfig
from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.layers import make_kind
from lightning_kfac.core.parametrized import (is_parametrization_container, own_trainable,
                                              parametrization_reason)


@dataclass
class Skipped:
    """A module with trainable parameters that K-FAC leaves alone, and why."""

    name: str
    type_name: str
    reason: str
    num_params: int


def _matches(patterns: List[str], name: str, type_name: str) -> str:
    for pattern in patterns:
        if re.search(pattern, name) or re.search(pattern, type_name):
            return pattern
    return ""


def layer_settings(config: KFACConfig, name: str, type_name: str) -> Dict[str, Any]:
    """Per-layer damping / clocks / method after applying ``layer_overrides`` in order."""
    settings = {
        "damping": config.damping,
        "factor_update_steps": config.factor_update_steps,
        "inv_update_steps": config.inv_update_steps,
        "compute_method": config.compute_method.value,
    }
    for override in config.layer_overrides:
        if re.search(override["regex"], name) or re.search(override["regex"], type_name):
            settings.update({k: v for k, v in override.items() if k != "regex"})
    return settings


def _param_owners(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter) -> names of the modules that hold it directly (frozen ones too: a frozen
    tied weight may be unfrozen later)."""
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return owners


def _tied_to(owners: Dict[int, List[str]], module: nn.Module, name: str) -> List[str]:
    """Other modules holding one of ``module``'s trainable parameters (tied weights)."""
    others = {o for p in module.parameters(recurse=False) for o in owners.get(id(p), ())}
    return sorted(others - {name})


def factor_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32, or the weight's dtype when it is wider (float64 models keep float64 factors)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def discover(model: nn.Module, config: KFACConfig) -> Tuple[Dict[str, KFACBlock], List[Skipped]]:
    """Blocks for the preconditioned modules (in ``named_modules`` order) and the skipped list."""
    blocks: Dict[str, KFACBlock] = {}
    skipped: List[Skipped] = []
    owners = _param_owners(model)
    for name, module in model.named_modules():
        if is_parametrization_container(module):
            continue  # its ``original`` parameters are counted (and listed) with their owner
        trainable = own_trainable(module)
        type_name = type(module).__name__
        kind, reason = make_kind(module)
        if kind is None or parametrization_reason(module):  # never evaluate a parametrization
            reason = reason or parametrization_reason(module)
            if trainable:
                skipped.append(Skipped(name, type_name, reason, trainable))
            continue
        # A frozen weight is registered too ("frozen (for now)" in the summary): it is neither
        # captured nor preconditioned until it is trainable and in the optimizer again
        # (Lightning's BackboneFinetuning, requires_grad_(True) mid-fit). Frozen skipped modules
        # are not listed (trainable == 0).
        weight = module.weight
        pattern = _matches(config.skip_layers, name, type_name)
        if pattern:
            if trainable:
                skipped.append(Skipped(name, type_name, f"matched skip_layers {pattern!r}",
                                       trainable))
            continue
        settings = layer_settings(config, name, type_name)
        if settings["compute_method"] == "skip":
            if trainable:
                skipped.append(Skipped(name, type_name, "layer_overrides: compute_method=skip",
                                       trainable))
            continue
        tied = _tied_to(owners, module, name)
        if tied:
            reason = (f"parameters tied to {', '.join(map(repr, tied))}: tied weights are not "
                      "preconditioned (their gradient sums several layers' uses)")
            if trainable:
                skipped.append(Skipped(name, type_name, reason, trainable))
            continue
        blocks[name] = KFACBlock(name, kind, factor_dtype(weight), **settings)
    return blocks, skipped
