"""Option validation (docs/conventions.md): every bad value raises ValueError naming the
option and the value; strings are accepted for enums, case-insensitively."""

from __future__ import annotations

import math
import warnings

import pytest
from torch import nn

from lightning_kfac.config import ComputeMethod, KFACConfig

# (option, bad value, fragment that must appear in the message besides the option name)
INVALID = [
    ("damping", 0, "0"),
    ("damping", -1.0, "-1.0"),
    ("damping", float("nan"), "nan"),
    ("damping", float("inf"), "inf"),
    ("damping", "abc", "'abc'"),
    ("damping", None, "None"),
    ("damping", True, "True"),
    ("factor_update_steps", 0, "0"),
    ("factor_update_steps", 1.5, "1.5"),
    ("factor_update_steps", -3, "-3"),
    ("factor_update_steps", "2", "'2'"),
    ("inv_update_steps", 0, "0"),
    ("inv_update_steps", 2.5, "2.5"),
    ("factor_decay", -0.1, "-0.1"),
    ("factor_decay", 1.0, "1.0"),
    ("factor_decay", float("nan"), "nan"),
    ("kl_clip", 0, "0"),
    ("kl_clip", -1, "-1"),
    ("kl_clip", float("nan"), "nan"),
    ("compute_method", "foo", "'foo'"),
    ("compute_method", 3, "3"),
    ("fisher_type", "fisherman", "'fisherman'"),
    ("likelihood", "poisson", "'poisson'"),
    ("output_module", 3, "3"),
    ("mc_samples", 0, "0"),
    ("gaussian_variance", 0.0, "0.0"),
    ("skip_layers", ["("], "'('"),
    ("skip_layers", [3], "[3]"),
    ("loss_reduction", "median", "'median'"),
    ("damping_mode", "weird", "'weird'"),
    ("warmup_steps", -1, "-1"),
    ("layer_overrides", [{"damping": 1.0}], "damping"),
    ("layer_overrides", [{"regex": "fc", "foo": 1}], "foo"),
    ("layer_overrides", [{"regex": "fc", "damping": -2.0}], "-2.0"),
    ("layer_overrides", [{"regex": "fc", "compute_method": "bar"}], "'bar'"),
    ("nonfinite", "ignore", "'ignore'"),
    ("max_decomposition_failures", 0, "0"),
]


@pytest.mark.parametrize(
    "option,value,fragment", INVALID, ids=[f"{o}={v!r}" for o, v, _ in INVALID]
)
def test_invalid_option_raises_value_error_naming_it(option, value, fragment) -> None:
    with pytest.raises(ValueError) as info:
        KFACConfig(**{option: value})
    message = str(info.value)
    assert option in message and fragment in message, message


@pytest.mark.parametrize(
    "option,value,allowed",
    [
        ("compute_method", "foo", ["eigen", "inverse", "ekfac"]),
        ("fisher_type", "x", ["empirical", "mc"]),
        ("likelihood", "x", ["categorical", "bernoulli", "gaussian"]),
        ("loss_reduction", "x", ["mean", "sum"]),
    ],
)
def test_enum_error_lists_allowed_values(option, value, allowed) -> None:
    with pytest.raises(ValueError) as info:
        KFACConfig(**{option: value})
    assert all(a in str(info.value) for a in allowed), str(info.value)


def test_bounds_message_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"factor_decay=1\.0.*\[0, 1\)"):
        KFACConfig(factor_decay=1.0)
    with pytest.raises(ValueError, match=r"damping=-1.*> 0"):
        KFACConfig(damping=-1)


def test_strings_accepted_for_enums_case_insensitive() -> None:
    cfg = KFACConfig(
        compute_method="INVERSE",
        fisher_type="Mc",
        likelihood="GAUSSIAN",
        loss_reduction="Sum",
        damping_mode="relative",
        nonfinite="RAISE",
    )
    assert cfg.compute_method == ComputeMethod.INVERSE and cfg.compute_method == "inverse"
    assert (cfg.fisher_type, cfg.likelihood, cfg.loss_reduction) == ("mc", "gaussian", "sum")
    assert (cfg.damping_mode, cfg.nonfinite) == ("relative", "raise")


def test_valid_edge_values_accepted() -> None:
    cfg = KFACConfig(
        damping=1,
        factor_decay=0.0,
        kl_clip=None,
        factor_update_steps=2.0,
        inv_update_steps=4,
        skip_layers="fc.*",
    )
    assert cfg.damping == 1.0 and isinstance(cfg.damping, float)
    assert cfg.factor_update_steps == 2 and isinstance(cfg.factor_update_steps, int)
    assert cfg.factor_decay == 0.0 and cfg.kl_clip is None and cfg.skip_layers == ["fc.*"]


def test_to_dict_round_trip() -> None:
    cfg = KFACConfig(
        damping=0.1,
        compute_method="inverse",
        skip_layers=["head"],
        layer_overrides=[{"regex": "conv", "damping": 0.5}],
    )
    plain = cfg.to_dict()
    assert plain["compute_method"] == "inverse" and type(plain["compute_method"]) is str
    assert KFACConfig(**plain) == cfg


def test_warning_when_inv_steps_not_multiple_of_factor_steps() -> None:
    with pytest.warns(UserWarning, match=r"inv_update_steps=10.*factor_update_steps=3"):
        KFACConfig(factor_update_steps=3, inv_update_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KFACConfig(factor_update_steps=5, inv_update_steps=10)


def test_unknown_keyword_raises_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="dampening"):
        KFACConfig.from_any(dampening=0.1)
    with pytest.raises(ValueError, match="dampening"):
        KFACConfig.from_any({"dampening": 0.1})


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2))


def test_preconditioner_raises_same_value_error() -> None:
    from lightning_kfac import KFACPreconditioner

    with pytest.raises(ValueError) as direct:
        KFACConfig(damping=-1)
    with pytest.raises(ValueError) as info:
        KFACPreconditioner(_model(), damping=-1)
    assert str(info.value) == str(direct.value)
    with pytest.raises(ValueError, match="compute_method='foo'"):
        KFACPreconditioner(_model(), compute_method="foo")


def test_preconditioner_rejects_unknown_keyword() -> None:
    from lightning_kfac import KFACPreconditioner

    with pytest.raises(ValueError, match="dampening"):
        KFACPreconditioner(_model(), dampening=0.1)


def test_preconditioner_accepts_config_object_and_keywords() -> None:
    """A KFACConfig or the same keywords give the same factors and update (docs/conventions.md)."""
    import torch

    from lightning_kfac import KFACPreconditioner

    grads = []
    for make in (
        lambda m: KFACPreconditioner(m, KFACConfig(damping=0.1, kl_clip=None)),
        lambda m: KFACPreconditioner(m, damping=0.1, kl_clip=None),
    ):
        torch.manual_seed(0)
        model = _model()
        pre = make(model)
        model(torch.randn(4, 3)).square().mean().backward()
        pre.step()
        grads.append(model[0].weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
    assert not math.isnan(float(grads[0].sum()))
