"""Config fuzz (hypothesis): random values for every KFACConfig option.

Must hold (docs/reliability.md, "config fuzz"): an invalid value raises ``ValueError`` naming the
option; a valid configuration trains a few steps with finite parameters and factors; any other
exception is a crash, and crashes must be 0. Two properties, derandomized (fixed examples, so the
suite is reproducible) and modest in size:

1. one option at a time set to an arbitrary value (every field of the dataclass, so options added
   later are fuzzed too);
2. random combinations of valid values for every option -> never a ValueError, finite steps.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_kfac import KFACConfig, KFACPreconditioner
from tests.reliability.common import LAYERS, all_finite, batch, factors_finite, mlp

pytestmark = pytest.mark.reliability

FIELDS = [f.name for f in dataclasses.fields(KFACConfig)]
DEFAULTS = KFACConfig()
EXAMPLES = int(os.environ.get("KFAC_FUZZ_EXAMPLES", "100"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="KFAC_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _enum_values(name: str):
    default = getattr(DEFAULTS, name, None)
    return [m.value for m in type(default)] if isinstance(default, enum.Enum) else []


def arbitrary(name: str) -> st.SearchStrategy:
    """Values of every kind, biased toward the option's own type and enum values."""
    words = _enum_values(name) + [v.upper() for v in _enum_values(name)] + ["bogus", "", "skip"]
    generic = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 40),
        st.floats(allow_nan=True, allow_infinity=True, width=64),
        st.sampled_from(words),
        st.text(max_size=4),
        st.lists(st.sampled_from(["fc0", "Linear", "[", "fc.*", 3]), max_size=2),
        st.lists(
            st.dictionaries(
                st.sampled_from(
                    ["regex", "damping", "compute_method", "factor_update_steps", "bogus"]
                ),
                st.one_of(
                    st.sampled_from(["fc1", "skip", "eigen", "("]),
                    st.floats(-1, 1),
                    st.integers(-1, 3),
                ),
                max_size=3,
            ),
            max_size=2,
        ),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    )
    if words[:-3]:
        return st.one_of(st.sampled_from(words), generic)
    return generic


def _names_an_option(err: ValueError, changed) -> bool:
    message = str(err)
    return any(name in message for name in changed)


def _train(options: dict[str, Any], steps: int = 3) -> str:
    """Build the config and the engine, train; return an outcome, raise on a crash."""
    model = mlp()
    try:
        config = KFACConfig(**options)
        pre = KFACPreconditioner(model, config)
    except ValueError as err:
        assert _names_an_option(err, options), f"ValueError not naming {sorted(options)}: {err}"
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        assert hooks == 0, f"a rejected configuration left {hooks} hooks on the model: {options}"
        return "rejected"
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in range(steps):
        opt.zero_grad()
        x, y = batch(t)
        out = model(x)
        if config.fisher_type == "mc":
            pre.mc_backward()
        F.cross_entropy(out, y).backward()
        pre.step(opt)
        opt.step()
    assert all_finite(model.parameters()) and factors_finite(pre), f"non-finite with {options}"
    return "trained"


def _run(property_fn, stats: Counter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        property_fn()


def test_one_option_arbitrary_value(reliability_row) -> None:
    stats: Counter = Counter()

    @SETTINGS
    @given(data=st.data())
    def prop(data) -> None:
        name = data.draw(st.sampled_from(FIELDS), label="option")
        value = data.draw(arbitrary(name), label="value")
        try:
            stats[_train({name: value})] += 1
        except AssertionError:
            raise
        except Exception as err:  # a crash other than ValueError
            stats["crash"] += 1
            raise AssertionError(
                f"{name}={value!r} crashed with {type(err).__name__}: {err}"
            ) from err

    try:
        _run(prop, stats)
    finally:
        total = sum(stats.values())
        reliability_row(
            "config fuzz",
            total,
            total - stats["crash"],
            f"crashes other than ValueError {stats['crash']} "
            f"({stats['rejected']} one-option values rejected naming the option, "
            f"{stats['trained']} accepted and trained)",
        )
    assert stats["rejected"] > 0 and stats["trained"] > 0, stats


def _valid_strategies() -> dict[str, st.SearchStrategy]:
    """A valid value for every option (the ranges KFACConfig documents)."""
    damping = st.floats(1e-6, 10.0)
    override = st.fixed_dictionaries(
        {"regex": st.sampled_from([*LAYERS, "Linear"])},
        optional={
            "damping": damping,
            "factor_update_steps": st.integers(1, 3),
            "inv_update_steps": st.integers(1, 3),
            "compute_method": st.sampled_from([*_enum_values("compute_method"), "skip"]),
        },
    )
    return {
        "damping": damping,
        "factor_update_steps": st.integers(1, 3),
        "inv_update_steps": st.integers(1, 3),  # used as a multiple of factor_update_steps
        "factor_decay": st.floats(0.0, 0.99),
        "kl_clip": st.one_of(st.none(), st.floats(1e-6, 1.0)),
        "compute_method": st.sampled_from(_enum_values("compute_method")),
        "fisher_type": st.sampled_from(_enum_values("fisher_type")),
        "likelihood": st.sampled_from(_enum_values("likelihood")),
        "mc_samples": st.integers(1, 3),
        "gaussian_variance": st.floats(0.1, 10.0),
        "skip_layers": st.lists(st.sampled_from(LAYERS), max_size=2),
        "loss_reduction": st.sampled_from(_enum_values("loss_reduction")),
        "output_reduction": st.sampled_from(_enum_values("output_reduction")),
        "damping_mode": st.sampled_from(_enum_values("damping_mode")),
        "factor_init": st.sampled_from(_enum_values("factor_init")),
        "warmup_steps": st.integers(0, 2),
        "damping_schedule": st.sampled_from(_enum_values("damping_schedule") or ["-"]),
        "damping_decay": st.floats(0.1, 1.0),
        "damping_step_size": st.integers(1, 3),
        "adaptive_damping": st.booleans(),
        "adaptive_damping_interval": st.integers(1, 3),
        "layer_overrides": st.lists(override, max_size=2),
        "nonfinite": st.just("skip"),  # "raise" is valid but turns a skip into an error
        "max_decomposition_failures": st.integers(1, 5),
        "distribute": st.sampled_from(_enum_values("distribute") or ["-"]),
        "low_rank": st.booleans(),
        "stagger_refresh": st.booleans(),
        "diagnostics_every_n_steps": st.one_of(st.none(), st.integers(1, 3)),
        "max_dense_dim": st.integers(0, 64),  # 0: every factor side diagonal
        "memory_budget_gib": st.one_of(st.none(), st.just(2.0)),
    }


# options the valid strategy leaves at their default: they need a model-specific value
# (output_module), are bounds/factors of the damping options, or need a loss closure in
# pre.step (step_rule="quadratic", tested in tests/test_step_rule.py)
DEFAULTED = {"output_module", "adaptive_damping_factor", "min_damping", "max_damping", "step_rule"}


def valid_options() -> st.SearchStrategy:
    def build(d: dict[str, Any]) -> dict[str, Any]:
        d["inv_update_steps"] *= d["factor_update_steps"]
        if d.get("adaptive_damping"):
            d["damping_schedule"], d["loss_reduction"] = "constant", "mean"
        return d

    chosen = {k: v for k, v in _valid_strategies().items() if k in FIELDS}
    return st.fixed_dictionaries(chosen).map(build)


def test_valid_combinations_train_finite_steps(reliability_row) -> None:
    stats: Counter = Counter()
    missing = sorted(set(FIELDS) - DEFAULTED - set(_valid_strategies()))

    @SETTINGS
    @given(options=valid_options())
    def prop(options) -> None:
        try:
            outcome = _train(options, steps=4)
        except AssertionError:
            raise
        except Exception as err:
            stats["crash"] += 1
            raise AssertionError(f"{options} crashed with {type(err).__name__}: {err}") from err
        stats[outcome] += 1
        assert outcome == "trained", f"a valid configuration was rejected: {options}"

    try:
        _run(prop, stats)
    finally:
        total = sum(stats.values())
        reliability_row(
            "config fuzz",
            total,
            total - stats["crash"],
            f"{stats['trained']} valid combinations trained finite steps",
        )
    assert not missing, f"options without a valid-value strategy: {missing}"


def test_model_dependent_option_rejected_without_hooks(reliability_row) -> None:
    """``output_module`` is checked against the model: ValueError, and no hook left behind."""
    outcome = _train({"fisher_type": "mc", "output_module": "no.such.module"})
    assert outcome == "rejected"
    reliability_row("config fuzz", 1, 1, "")
