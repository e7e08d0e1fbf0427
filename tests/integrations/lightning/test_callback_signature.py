"""KFACCallback's typed signature mirrors KFACConfig (one source of truth for the defaults).

The keywords exist so that IDEs, ``--help`` and jsonargparse (LightningCLI) see every option with
its type; KFACConfig stays the source of the defaults and the validation. These tests fail, naming
the line to add, as soon as a KFACConfig option is added, renamed or changes default or type.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import types
import typing
from typing import Any, Literal, Union

import pytest
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_kfac import KFACConfig
from lightning_kfac.integrations.lightning.callback import CALLBACK_ONLY_OPTIONS, KFACCallback

FIELDS = {f.name: f for f in dataclasses.fields(KFACConfig)}
CONFIG_HINTS = typing.get_type_hints(KFACConfig)
INIT_HINTS = typing.get_type_hints(KFACCallback.__init__)
PARAMS = inspect.signature(KFACCallback.__init__).parameters


def _type_text(hint: Any) -> str:
    return (
        repr(hint)
        .replace("typing.", "")
        .replace("NoneType", "None")
        .replace("<class '", "")
        .replace("'>", "")
    )


def spelling_free(hint: Any) -> Any:
    """The type with its spelling normalized: ``Optional[List[str]]`` and ``list[str] | None``
    compare equal (either file may use either spelling)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return ("union", frozenset(spelling_free(arg) for arg in args))
    if origin is Literal:
        return ("literal", frozenset(args))  # Literal compares its values as a set
    if origin is not None:
        return (origin, tuple(spelling_free(arg) for arg in args))
    return hint


def expected_annotation(name: str) -> Any:
    """Enums -> Literal of their values (lowercase strings on the CLI); lists -> Optional[...]
    with None meaning empty (no mutable default); anything else: KFACConfig's own type."""
    hint = CONFIG_HINTS[name]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return Literal[tuple(member.value for member in hint)]
    if typing.get_origin(hint) is list:
        return hint | None
    return hint


def expected_default(name: str) -> Any:
    field = FIELDS[name]
    if field.default_factory is not dataclasses.MISSING:
        assert field.default_factory() == [], name
        return None
    return field.default.value if isinstance(field.default, enum.Enum) else field.default


def suggested_line(name: str) -> str:
    annotation = expected_annotation(name)
    text = (
        f"Literal{list(typing.get_args(annotation))}".replace("[[", "[").replace("]]", "]")
        if typing.get_origin(annotation) is Literal
        else _type_text(annotation)
    )
    return f"{name}: {text} = {expected_default(name)!r},"


def test_every_kfacconfig_option_is_a_typed_keyword_with_its_default():
    missing = [name for name in FIELDS if name not in PARAMS]
    assert not missing, (
        "KFACConfig has options that KFACCallback.__init__ does not list; add these keyword-only "
        "parameters to its signature (lightning_kfac/integrations/lightning/callback.py), before "
        "`prog_bar`:\n    " + "\n    ".join(suggested_line(name) for name in missing)
    )
    extra = [
        name
        for name, p in PARAMS.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and name not in FIELDS
        and name not in CALLBACK_ONLY_OPTIONS
    ]
    assert not extra, f"KFACCallback.__init__ has keywords {extra} that KFACConfig lacks"
    for name in FIELDS:
        param = PARAMS[name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert spelling_free(INIT_HINTS[name]) == spelling_free(expected_annotation(name)), (
            f"KFACCallback.__init__: {name} is typed {_type_text(INIT_HINTS[name])}; KFACConfig "
            f"types it {_type_text(CONFIG_HINTS[name])}: write `{suggested_line(name)}`"
        )
        assert param.default == expected_default(name) and type(param.default) is type(
            expected_default(name)
        ), (
            f"KFACCallback.__init__: {name} defaults to {param.default!r}, KFACConfig to "
            f"{expected_default(name)!r}: write `{suggested_line(name)}`"
        )


def test_the_suggested_line_is_valid_python_for_the_right_annotation_and_default():
    """What the failure message tells to add evaluates to the expected annotation and default."""
    for name in FIELDS:
        text, default = suggested_line(name).rstrip(",").split(": ", 1)[1].split(" = ")
        assert eval(text, vars(typing)) == expected_annotation(name), name
        assert eval(default) == expected_default(name), name


def test_every_option_has_a_help_line():
    """``__init__``'s docstring (shown by LightningCLI --help) describes every keyword."""
    doc = KFACCallback.__init__.__doc__
    for name in [*FIELDS, "config", *CALLBACK_ONLY_OPTIONS]:
        assert f"\n    {name}: " in doc, name


def test_keywords_at_their_defaults_leave_the_config_mapping_alone():
    """What jsonargparse does: every keyword passed, at its default, next to ``config``."""
    defaults = {
        name: p.default for name, p in PARAMS.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    mapping = {
        "damping": 2e-2,
        "compute_method": "inverse",
        "low_rank": False,
        "kl_clip": None,
        "skip_layers": ["head"],
        "diagnostics_every_n_steps": 5,
    }
    callback = KFACCallback(mapping, **defaults)
    assert callback.config == KFACConfig(**mapping)
    overridden = KFACCallback(mapping, **dict(defaults, damping=5e-2, compute_method="ekfac"))
    assert overridden.config == KFACConfig(**dict(mapping, damping=5e-2, compute_method="ekfac"))
    # the documented rule: a keyword at its default (low_rank=True) leaves the mapping's value
    assert KFACCallback(mapping, low_rank=True).config.low_rank is False
    assert KFACCallback(KFACConfig(**mapping), **defaults).config == KFACConfig(**mapping)


@pytest.mark.parametrize(
    "option, value",
    [("adaptive_damping", 0), ("mc_samples", True), ("low_rank", 1), ("damping", "1e-3")],
)
def test_a_wrong_type_equal_to_the_default_is_still_rejected(option, value):
    with pytest.raises(MisconfigurationException, match=f"Invalid {option}="):
        KFACCallback(**{option: value})


def test_enum_members_and_uppercase_strings_still_work_in_python():
    from lightning_kfac.config import ComputeMethod

    assert KFACCallback(compute_method=ComputeMethod.INVERSE).config.compute_method == "inverse"
    assert KFACCallback(compute_method="EKFAC").config.compute_method == "ekfac"


def test_lightning_package_class_is_both_packages_callback():
    lightning_pytorch = pytest.importorskip("lightning.pytorch")
    import pytorch_lightning as pl

    from lightning_kfac.integrations.lightning.unified import KFACCallback as UnifiedKFACCallback

    callback = UnifiedKFACCallback(damping=2e-2)
    assert isinstance(callback, lightning_pytorch.Callback) and isinstance(callback, pl.Callback)
    assert isinstance(callback, KFACCallback) and callback.config.damping == 2e-2
    assert callback.state_key == KFACCallback(damping=2e-2).state_key
    assert inspect.signature(UnifiedKFACCallback) == inspect.signature(KFACCallback)
