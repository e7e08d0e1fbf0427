"""Hydra ConfigStore registration of the K-FAC options schema (the only module importing hydra).

Plain YAML accepts anything: ``kfac.dampng=1`` (a typo) or ``kfac.factor_update_steps=abc`` (a
string where an integer belongs) would reach the callback, or be silently ignored. A structured
config (a dataclass registered in Hydra's ConfigStore) makes OmegaConf check keys and types at
composition time, with Hydra's own messages:
``Key 'dampng' not in 'KFACSchema'`` and ``Value 'abc' of type 'str' could not be converted to
Integer``. Values out of range (``damping=-1``) are rejected later, when the callback builds its
:class:`~lightning_kfac.config.KFACConfig` (``ValueError: Invalid damping=-1.0: ...``).

The schema mirrors :class:`~lightning_kfac.config.KFACConfig` field by field, so it can never
drift from it: enum fields become ``str`` (YAML-friendly; KFACConfig validates the value), every
other field keeps its type and default. Two Hydra keys are added: ``_target_`` (the callback) and
``_convert_: all`` (the callback receives plain lists/dicts, not OmegaConf containers).

Usage (``conf/kfac/default.yaml`` lists ``/kfac_schema@_here_`` first in its defaults)::

    from lightning_kfac.integrations.hydra import register_configs
    register_configs()          # before @hydra.main runs, or before initialize_config_dir
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from lightning_kfac.config import KFACConfig

#: The schema is stored as a config outside any group (``kfac_schema``), so that ``--help`` does
#: not offer it as a ``kfac=`` choice; ``conf/kfac/*.yaml`` extend it with
#: ``defaults: [/kfac_schema@_here_, _self_]``.
SCHEMA_GROUP = None
SCHEMA_NAME = "kfac_schema"
#: What ``hydra.utils.instantiate(cfg.kfac)`` builds.
CALLBACK_TARGET = "lightning_kfac.KFACCallback"

# Types OmegaConf can check for structured configs; anything else is typed Any.
_SUPPORTED = (bool, int, float, str)


def _schema_type(hint: Any) -> Any:
    """Map a KFACConfig type hint to one OmegaConf validates (enums -> str)."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return str
    if hint in _SUPPORTED:
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _schema_type(next(a for a in args if a is not type(None)))
        return Optional[inner] if inner is not Any else Any  # noqa: UP045 (OmegaConf's spelling)
    if origin is list and len(args) == 1:
        return types.GenericAlias(list, (_schema_type(args[0]),))  # list[element]
    if origin is dict and len(args) == 2 and args[0] is str:
        return types.GenericAlias(dict, (str, _schema_type(args[1])))  # dict[str, value]
    return Any


def _schema_field(field: dataclasses.Field[Any]) -> dataclasses.Field[Any]:
    if field.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=field.default_factory)
    default = field.default
    if isinstance(default, enum.Enum):
        default = default.value
    schema_field: dataclasses.Field[Any] = dataclasses.field(default=default)
    return schema_field


def _build_schema() -> type:
    hints = typing.get_type_hints(KFACConfig)
    fields: list[tuple[str, Any, Any]] = [  # (name, type, dataclasses.field)
        ("_target_", str, dataclasses.field(default=CALLBACK_TARGET)),
        ("_convert_", str, dataclasses.field(default="all")),
    ]
    for field in dataclasses.fields(KFACConfig):
        fields.append((field.name, _schema_type(hints[field.name]), _schema_field(field)))
    return dataclasses.make_dataclass(
        "KFACSchema",
        fields,
        namespace={"__doc__": "Hydra schema of KFACCallback's options (mirrors KFACConfig)."},
    )


#: The structured schema: one field per KFACConfig option, plus ``_target_`` and ``_convert_``.
KFACSchema = _build_schema()


def register_configs(store: ConfigStore | None = None) -> None:
    """Store :data:`KFACSchema` as ``kfac_schema`` in Hydra's ConfigStore (idempotent)."""
    (store or ConfigStore.instance()).store(group=SCHEMA_GROUP, name=SCHEMA_NAME, node=KFACSchema)


__all__ = ["CALLBACK_TARGET", "SCHEMA_GROUP", "SCHEMA_NAME", "KFACSchema", "register_configs"]
