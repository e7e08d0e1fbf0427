"""Checks applied to a K-FAC state before it is restored (``KFACPreconditioner.load_state_dict``).

A state is refused, before anything is changed, when it cannot describe this run's layers:

- its ``version`` is not one this code writes (``STATE_VERSION``);
- a layer's factor or decomposition has another shape than this run's layer gives (a resized
  layer, a bias frozen or unfrozen: ``W~ = [W b]`` loses or gains a column), with the layer's name.

What can be converted is converted: tensors are cast to the dtype this run computes them in (the
factor dtype of the layer; ``damping_scale`` stays float64), so a state saved under ``32-true``
resumes under ``64-true`` and back.

A decomposition depends on options as well as on the factors: the keys it holds are the fields
of its method's decomposition type (core/methods/: eigen ``QA eA QG eG``; inverse
``A_inv G_inv``; ekfac: eigen plus ``scale``), ``damping_mode="relative"`` adds
``damping_scale``, and a method with ``damping_in_decomposition`` (inverse) bakes the damping into
it (Martens & Grosse 2015, sec. 6.3). ``stale_decompositions``
names the layers whose saved decomposition was built under other options; the engine recomputes
those from the restored factors, so changed options act from the first resumed step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_kfac.core.methods import method_for, method_of_state

STATE_VERSION = 1

# Options that change the damping baked into an inverse decomposition.
DAMPING_OPTIONS = (
    "damping",
    "damping_schedule",
    "damping_decay",
    "damping_step_size",
    "adaptive_damping",
    "adaptive_damping_interval",
    "adaptive_damping_factor",
    "min_damping",
    "max_damping",
)


def check_version(state: Mapping[str, Any]) -> None:
    """Refuse a state of an unknown version (a state without layers may omit it)."""
    version = state.get("version")
    if version is None and not state.get("layers"):
        return
    if version != STATE_VERSION:
        raise ValueError(
            f"K-FAC state version {version!r} is not supported: this lightning_kfac reads "
            f"version {STATE_VERSION}. Was the checkpoint written by another release of "
            "lightning_kfac? Load it with that release, or resume without its K-FAC state."
        )


def decomposition_method(dec: Mapping[str, Tensor]) -> str | None:
    """The ``compute_method`` a decomposition was built for, from its keys (None: empty)."""
    method = method_of_state(dec)
    return None if method is None else method.name


def _expected_shapes(block: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of this run's factors and decomposition entries of ``block``.

    A factor is a matrix (d x d), its diagonal (d,) or a stack of matrices (k x d x d, one per
    group); its eigenvectors have its shape, its eigenvalues drop the last dimension (a diagonal
    keeps its shape), its damped inverse has its shape.
    """
    a_hat, g_hat = block.batch_estimates()  # zeros of the right shape when nothing is captured
    shapes = {"A": tuple(a_hat.shape), "G": tuple(g_hat.shape), "damping_scale": ()}
    for name, factor in (("A", a_hat), ("G", g_hat)):
        shape = tuple(factor.shape)
        shapes[f"Q{name}"] = shape
        shapes[f"e{name}"] = shape[:-1] if len(shape) > 1 else shape
        shapes[f"{name}_inv"] = shape
    if a_hat.dim() == 2 and g_hat.dim() == 2:
        shapes["scale"] = (g_hat.shape[0], a_hat.shape[0])
    return shapes


def check_layer(name: str, block: Any, layer_state: Mapping[str, Any]) -> None:
    """Refuse a layer state whose tensors do not fit this run's layer, naming the layer."""
    expected = _expected_shapes(block)
    try:
        method_of_state(layer_state.get("decomposition") or {})  # its keys fit a known method
    except ValueError as err:
        raise ValueError(f"K-FAC state of layer {name!r}: {err}") from None
    found: list[tuple[str, Any]] = [(k, layer_state[k]) for k in ("A", "G") if k in layer_state]
    found += [
        (f"decomposition[{k!r}]", v) for k, v in (layer_state.get("decomposition") or {}).items()
    ]
    for label, value in found:
        key = label.split("'")[1] if label.startswith("decomposition") else label
        if not isinstance(value, Tensor):
            raise ValueError(
                f"K-FAC state of layer {name!r}: {label} is a {type(value).__name__}, not a tensor."
            )
        want = expected.get(key)
        if want is not None and tuple(value.shape) != want:
            raise ValueError(
                f"K-FAC state of layer {name!r} does not fit this model: {label} has shape "
                f"{tuple(value.shape)}, this layer needs {want} (A is d_A x d_A with d_A = inputs "
                "+ 1 for a trainable bias, G is d_G x d_G with d_G = outputs; per group for "
                "grouped convolutions). Was the layer resized, or its bias frozen or unfrozen, "
                "since the state was saved?"
            )


def cast_layer(block: Any, layer_state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``layer_state`` with every tensor in the dtype this run computes it in."""
    out = dict(layer_state)
    for key in ("A", "G"):
        if key in out:
            out[key] = out[key].to(block.dtype)
    dec = layer_state.get("decomposition") or {}
    # integer entries (the support indices of a deflated factor, core/linalg.py) keep their dtype
    out["decomposition"] = {
        k: v
        if not v.is_floating_point()
        else v.to(torch.float64 if k in ("damping_scale", "scale_updates") else block.dtype)
        for k, v in dec.items()
    }
    return out


def stale_decompositions(
    blocks: Mapping[str, Any], config: Any, state: Mapping[str, Any]
) -> dict[str, str]:
    """Layer name -> the changed option(s), for saved decompositions built under other options.

    ``blocks``: this run's name -> block; ``config``: this run's ``KFACConfig``.

    Compared: the method (from the decomposition's keys), ``damping_mode`` (a relative
    decomposition holds ``damping_scale``) and, for a method that bakes the damping into its
    decomposition (inverse) only, the damping options and the layer's own damping
    (``layer_overrides``): eigen and EKFAC apply the damping at every step, so a changed damping
    needs no new decomposition there.
    """
    saved_config = state.get("config") or {}
    current = config.to_dict()
    changed_damping = [
        k for k in DAMPING_OPTIONS if k in saved_config and saved_config[k] != current[k]
    ]
    relative = str(config.damping_mode) == "relative"
    stale: dict[str, str] = {}
    for name, layer_state in (state.get("layers") or {}).items():
        dec = layer_state.get("decomposition") or {}
        block = blocks[name]
        saved = decomposition_method(dec)
        if saved is None:
            continue
        reasons = []
        if saved != block.method.name:
            reasons.append(f"compute_method {saved!r} -> {block.method.name!r}")
        if ("damping_scale" in dec) != relative:
            was = "relative" if "damping_scale" in dec else "absolute"
            reasons.append(f"damping_mode {was!r} -> {str(config.damping_mode)!r}")
        if saved == block.method.name and method_for(saved).damping_in_decomposition:
            layer_damping = layer_state.get("damping")
            if layer_damping is not None and float(layer_damping) != float(block.damping):
                reasons.append(
                    f"damping of the layer {float(layer_damping):g} -> {float(block.damping):g}"
                )
            reasons += [f"{k} {saved_config[k]!r} -> {current[k]!r}" for k in changed_damping]
        if reasons:
            stale[name] = ", ".join(dict.fromkeys(reasons))
    return stale
