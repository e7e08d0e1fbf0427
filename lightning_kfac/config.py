"""KFACConfig: every K-FAC option in one keyword-only dataclass, validated on construction.

Standard library only (no torch, no Lightning, no Hydra), so that configuration errors are cheap
to raise and the schema can be mirrored by Hydra's ConfigStore.

Every invalid value raises ``ValueError`` with a message of the form
``Invalid damping=-1.0: must be a finite number > 0.`` naming the option, the value given and
what is allowed. Strings are accepted wherever an enum exists (YAML-friendly).

Example:
    >>> cfg = KFACConfig(damping=1e-2, compute_method="inverse")
    >>> cfg.compute_method
    <ComputeMethod.INVERSE: 'inverse'>
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any


class _StrEnum(str, enum.Enum):
    """An enum whose members compare equal to their string value ("eigen"
    == ComputeMethod.EIGEN)."""

    def __str__(self) -> str:  # pragma: no cover - trivial
        text: str = self.value
        return text


class ComputeMethod(_StrEnum):
    """How ``(A (x) G + damping I)^-1`` is applied (docs/conventions.md)."""

    EIGEN = "eigen"
    INVERSE = "inverse"
    EKFAC = "ekfac"


class FisherType(_StrEnum):
    """Which gradients form the G factor: the user's loss, or labels sampled from the model."""

    EMPIRICAL = "empirical"
    MC = "mc"


class Likelihood(_StrEnum):
    """Predictive distribution used to sample labels for ``fisher_type="mc"``."""

    CATEGORICAL = "categorical"
    BERNOULLI = "bernoulli"
    GAUSSIAN = "gaussian"


class LossReduction(_StrEnum):
    """How the user's loss reduces per-example terms: ``mean`` (L = 1/N sum l_n) or ``sum``."""

    MEAN = "mean"
    SUM = "sum"


class OutputReduction(_StrEnum):
    """``fisher_type="mc"`` (bernoulli, gaussian): how the loss reduces one example's outputs:
    ``mean`` (PyTorch's default ``BCEWithLogitsLoss`` / ``MSELoss``) or ``sum`` (the last
    dimension summed, e.g. a cross-entropy summed over pixels per case)."""

    MEAN = "mean"
    SUM = "sum"


class DampingMode(_StrEnum):
    """``absolute``: damping as given; ``relative``: multiplied per layer by
    (tr A/dim A)(tr G/dim G)."""

    ABSOLUTE = "absolute"
    RELATIVE = "relative"


class FactorInit(_StrEnum):
    """How the running factors start (core/blocks.py): ``batch`` sets them to the first batch
    estimate; ``identity`` starts both at ``I`` and ``scaled_identity`` at ``(tr X^/dim X^) I`` (the
    isotropic part of the first estimate), blending the estimates in by the running average."""

    BATCH = "batch"
    IDENTITY = "identity"
    SCALED_IDENTITY = "scaled_identity"


class DampingSchedule(_StrEnum):
    """Damping over optimizer steps t (core/damping.py): ``constant``, ``exponential``
    (``damping * decay ** (t / step_size)``) or ``step`` (``damping * decay
    ** (t // step_size)``)."""

    CONSTANT = "constant"
    EXPONENTIAL = "exponential"
    STEP = "step"


class NonFinitePolicy(_StrEnum):
    """What to do with a NaN/inf batch estimate or preconditioned gradient."""

    SKIP = "skip"
    RAISE = "raise"


class Distribute(_StrEnum):
    """Who does the second-order work under data parallelism (core/kaisa.py, KAISA SC'21)."""

    REPLICATE = "replicate"
    DECOMPOSITIONS = "decompositions"
    GRADIENTS = "gradients"


class StepRule(_StrEnum):
    """Who turns the preconditioned direction into the update (lightning_kfac/step_rule.py)."""

    OPTIMIZER = "optimizer"
    QUADRATIC = "quadratic"


def _invalid(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"Invalid {name}={value!r}: {allowed}.")


def _unknown_options(unknown: list[str], allowed: list[str]) -> ValueError:
    """``Invalid option(s) ['dampng'] (did you mean 'damping'?): allowed options are [...]``."""
    close = [match for name in unknown for match in difflib.get_close_matches(name, allowed, n=1)]
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    return ValueError(f"Invalid option(s) {unknown}{hint}: allowed options are {allowed}.")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_float(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = False,
    high_inclusive: bool = True,
) -> float:
    if math.isinf(high):
        allowed = f"must be a finite number {'>=' if low_inclusive else '>'} {low:g}"
    else:
        allowed = (
            f"must be a number in {'[' if low_inclusive else '('}{low:g}, "
            f"{high:g}{']' if high_inclusive else ')'}"
        )
    if not _is_real(value) or not math.isfinite(float(value)):
        raise _invalid(name, value, allowed)
    number = float(value)
    too_low = number < low if low_inclusive else number <= low
    too_high = number > high if high_inclusive else number >= high
    if too_low or too_high:
        raise _invalid(name, value, allowed)
    return number


def _check_int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _invalid(name, value, f"must be an integer >= {low}")
    if value < low:
        raise _invalid(name, value, f"must be an integer >= {low}")
    checked: int = value
    return checked


def _check_enum(name: str, value: Any, enum_cls: type[enum.Enum]) -> Any:
    try:
        return enum_cls(value.lower() if isinstance(value, str) else value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise _invalid(name, value, f"must be one of {allowed}") from None


def _check_method(name: str, value: Any) -> Any:
    """A built-in ``ComputeMethod``, or the name of a method added to the registry
    (lightning_kfac/core/methods/registry.py; imported here, at validation time, only)."""
    try:
        return ComputeMethod(value.lower() if isinstance(value, str) else value)
    except ValueError:
        from lightning_kfac.core.methods.registry import METHODS

        if isinstance(value, str) and value.lower() in METHODS:
            return value.lower()
        allowed = ", ".join(repr(m) for m in METHODS)
        raise _invalid(name, value, f"must be one of {allowed}") from None


def _check_regex_list(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise _invalid(name, value, "must be a list of regular-expression strings")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise _invalid(name, pattern, f"is not a valid regular expression ({err})") from None
    return list(value)


_OVERRIDE_KEYS = {
    "regex",
    "damping",
    "factor_update_steps",
    "inv_update_steps",
    "compute_method",
    "max_dense_dim",
    "a_structure",
    "g_structure",
}


@dataclasses.dataclass(kw_only=True)
class KFACConfig:
    """All K-FAC options (docs/conventions.md). Keyword-only; validated in ``__post_init__``.

    Attributes:
        damping: Tikhonov damping lambda > 0 added to the Kronecker-factored Fisher.
        factor_update_steps: update the Kronecker factors every N optimizer steps.
        inv_update_steps: recompute eigendecompositions / inverses every M optimizer steps.
        factor_decay: running-average weight of the old factor, in [0, 1).
        kl_clip: trust-region scale ``min(1, sqrt(c / |sum P*grad| lr^2))``; None disables it.
        compute_method: "eigen" (exact damping), "inverse" (factored damping, M&G 2015 sec. 6.3)
            or "ekfac" (eigenvalue-corrected K-FAC, George et al. 2018).
        fisher_type: "empirical" (the user's loss) or "mc" (labels sampled from the model).
        likelihood: for ``fisher_type="mc"``: "categorical", "bernoulli" or "gaussian".
        output_module: for ``fisher_type="mc"``: qualified name of the submodule whose output is
            the model output; None means the LightningModule's (or model's) own forward output.
        mc_samples: number of sampled labels per example for ``fisher_type="mc"``.
        gaussian_variance: variance of the Gaussian likelihood for ``fisher_type="mc"``.
        skip_layers: regexes searched in each module's qualified name and class name.
        loss_reduction: "mean" (default: L = 1/N sum_n l_n) or "sum"; sets the per-example
            scale of g.
        output_reduction: for ``fisher_type="mc"`` with a bernoulli or gaussian likelihood under
            ``loss_reduction="mean"``: "mean" (default, as ``nn.MSELoss()`` and
            ``nn.BCEWithLogitsLoss()``: the mean over every output element, so a loss averaged
            over C outputs scales the MC G by 1/C^2 like the empirical one) or "sum" (the last
            dimension is summed, the other positions averaged). core/mc.py, ``loss_terms``.
        damping_mode: "absolute" (default: damping as given) or "relative" (damping x
            (tr A/dim A)(tr G/dim G) per layer, one value for any loss scale); docs/defaults.md.
        factor_init: "batch" (default: the first update sets the factors to the batch estimates),
            "identity" (start at I, then the running average) or "scaled_identity" (start at
            (tr X^/dim) I of the first estimate X^, then the running average); see FactorInit.
        warmup_steps: steps during which factors are estimated but gradients are left raw.
        damping_schedule: "constant" (default), "exponential" or "step" (see DampingSchedule).
        damping_decay: the schedule's factor per ``damping_step_size`` steps, in (0, 1].
        damping_step_size: steps per ``damping_decay`` factor of the schedule (>= 1).
        adaptive_damping: Levenberg-Marquardt adaptation (Martens & Grosse 2015, sec. 6.5),
            off by default; needs ``pre.update_damping(...)`` after each adaptation step.
        adaptive_damping_interval: T, adapt every T optimizer steps.
        adaptive_damping_factor: omega in (0, 1); None means (19/20)**T as in the paper.
        min_damping: lower bound (>= 0) for scheduled / adapted damping.
        max_damping: upper bound for scheduled / adapted damping; None means unbounded.
        layer_overrides: ordered list of {regex, damping, factor_update_steps, inv_update_steps,
            compute_method, max_dense_dim, a_structure, g_structure} dicts; ``compute_method:
            skip`` leaves matching layers out; ``a_structure`` / ``g_structure`` pick a registered
            factor structure ("dense", "diagonal", "isotropic") for that side.
        nonfinite: "skip" (discard the estimate / keep the raw gradient, count, warn once)
            or "raise".
        max_decomposition_failures: consecutive failed decompositions of one layer before an error.
        distribute: under DDP (world > 1), who does the second-order work (core/kaisa.py;
            KAISA, Pauloski et al. SC'21); each layer has one owner rank. "gradients" (default,
            fastest here: benchmarks/communication.py): the owner decomposes the layer, keeps the
            decomposition and broadcasts the preconditioned gradient every step (memory: 1/world
            of the decompositions; compute: 1/world of decompositions and preconditioning;
            traffic: a gradient's size every step; ``state_dict`` becomes collective).
            "decompositions": the owner broadcasts the decomposition, every rank preconditions
            every layer (memory: all decompositions; traffic: the decompositions once per
            refresh). "replicate": every rank decomposes every layer (no traffic, world x the
            compute). Ignored with one process.
        low_rank: precondition Linear layers at rank R (the step's example rows) when R is small
            against the layer width and Freivalds' check proves ``grad W~ == Gm^T Am``
            (core/lowrank.py); exact, falls back to the full computation otherwise.
        stagger_refresh: spread the layers' refreshes over the ``inv_update_steps`` interval
            (core/stagger.py): each layer keeps its period but gets an offset on the factor clock,
            chosen to balance the decomposition cost (d_A^3 + d_G^3) per step, so that no step
            after the first (t = 0, every layer) decomposes every layer. Off by default (then
            every layer refreshes at t % inv_update_steps == 0).
        diagnostics_every_n_steps: None (off, the default) or N >= 1: every N optimizer steps the
            callback logs each layer's Kronecker approximation error and ``||E[g]||`` on that
            step's batch (``kfac_diag/<layer>/...``;
            integrations/lightning/diagnostics_callback.py).
        max_dense_dim: a factor side (A or G) of dimension <= this is a dense matrix, a wider one
            is kept as its diagonal (core/factors.py); 2048 keeps one refresh of a side at a few
            CPU-seconds (an eigh of d = 4096 takes ~36 CPU-s on 2 cores). Per layer via
            ``layer_overrides``; 0 makes every side diagonal.
        memory_budget_gib: the predicted peak memory of K-FAC (factors, decompositions and the
            temporaries of capture, decomposition and preconditioning; core/footprint.py), in GiB;
            when exceeded the widest dense sides become diagonal until it fits, and a model that
            does not fit even then is refused. None: no budget.
        step_rule: "optimizer" (default: the preconditioned gradient replaces ``.grad`` and the
            user's optimizer steps) or "quadratic" (Martens & Grosse 2015, sec. 7: the engine
            moves the preconditioned parameters by ``alpha Delta + mu delta_0`` chosen on the
            exact quadratic model and sets their ``.grad`` to None; lightning_kfac/step_rule.py).
    """

    damping: float = 1e-3
    factor_update_steps: int = 10
    inv_update_steps: int = 100
    factor_decay: float = 0.95
    kl_clip: float | None = 1e-3
    compute_method: ComputeMethod = ComputeMethod.EIGEN
    fisher_type: FisherType = FisherType.EMPIRICAL
    likelihood: Likelihood = Likelihood.CATEGORICAL
    output_module: str | None = None
    mc_samples: int = 1
    gaussian_variance: float = 1.0
    skip_layers: list[str] = dataclasses.field(default_factory=list)
    loss_reduction: LossReduction = LossReduction.MEAN
    output_reduction: OutputReduction = OutputReduction.MEAN
    damping_mode: DampingMode = DampingMode.ABSOLUTE
    factor_init: FactorInit = FactorInit.BATCH
    warmup_steps: int = 0
    damping_schedule: DampingSchedule = DampingSchedule.CONSTANT
    damping_decay: float = 0.5
    damping_step_size: int = 1000
    adaptive_damping: bool = False
    adaptive_damping_interval: int = 5
    adaptive_damping_factor: float | None = None
    min_damping: float = 0.0
    max_damping: float | None = None
    layer_overrides: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    nonfinite: NonFinitePolicy = NonFinitePolicy.SKIP
    max_decomposition_failures: int = 3
    distribute: Distribute = Distribute.GRADIENTS
    low_rank: bool = True
    stagger_refresh: bool = False
    diagnostics_every_n_steps: int | None = None
    max_dense_dim: int = 2048
    memory_budget_gib: float | None = 2.0
    step_rule: StepRule = StepRule.OPTIMIZER  # lightning_kfac/step_rule.py

    def __post_init__(self) -> None:
        self.damping = _check_float("damping", self.damping, low=0.0)
        self.factor_update_steps = _check_int(
            "factor_update_steps", self.factor_update_steps, low=1
        )
        self.inv_update_steps = _check_int("inv_update_steps", self.inv_update_steps, low=1)
        self.factor_decay = _check_float(
            "factor_decay",
            self.factor_decay,
            low=0.0,
            high=1.0,
            low_inclusive=True,
            high_inclusive=False,
        )
        if self.kl_clip is not None:
            self.kl_clip = _check_float("kl_clip", self.kl_clip, low=0.0)
        self.compute_method = _check_method("compute_method", self.compute_method)
        self.fisher_type = _check_enum("fisher_type", self.fisher_type, FisherType)
        self.likelihood = _check_enum("likelihood", self.likelihood, Likelihood)
        if self.output_module is not None and not isinstance(self.output_module, str):
            raise _invalid(
                "output_module",
                self.output_module,
                "must be None or the qualified name of a submodule (a string)",
            )
        self.mc_samples = _check_int("mc_samples", self.mc_samples, low=1)
        self.gaussian_variance = _check_float("gaussian_variance", self.gaussian_variance, low=0.0)
        self.skip_layers = _check_regex_list("skip_layers", self.skip_layers)
        self.loss_reduction = _check_enum("loss_reduction", self.loss_reduction, LossReduction)
        self.output_reduction = _check_enum(
            "output_reduction", self.output_reduction, OutputReduction
        )
        self.damping_mode = _check_enum("damping_mode", self.damping_mode, DampingMode)
        self.factor_init = _check_enum("factor_init", self.factor_init, FactorInit)
        self.warmup_steps = _check_int("warmup_steps", self.warmup_steps, low=0)
        self._check_damping_over_time()
        self.layer_overrides = self._check_overrides(self.layer_overrides)
        self.nonfinite = _check_enum("nonfinite", self.nonfinite, NonFinitePolicy)
        if not isinstance(self.low_rank, bool):
            raise _invalid("low_rank", self.low_rank, "must be true or false")
        if not isinstance(self.stagger_refresh, bool):
            raise _invalid("stagger_refresh", self.stagger_refresh, "must be true or false")
        self.max_decomposition_failures = _check_int(
            "max_decomposition_failures", self.max_decomposition_failures, low=1
        )
        self.distribute = _check_enum("distribute", self.distribute, Distribute)
        if self.diagnostics_every_n_steps is not None:
            try:
                self.diagnostics_every_n_steps = _check_int(
                    "diagnostics_every_n_steps", self.diagnostics_every_n_steps, low=1
                )
            except ValueError:
                raise _invalid(
                    "diagnostics_every_n_steps",
                    self.diagnostics_every_n_steps,
                    "must be None (off) or an integer >= 1",
                ) from None
        self.max_dense_dim = _check_int("max_dense_dim", self.max_dense_dim, low=0)
        if self.memory_budget_gib is not None:
            try:
                self.memory_budget_gib = _check_float(
                    "memory_budget_gib", self.memory_budget_gib, low=0.0
                )
            except ValueError:
                raise _invalid(
                    "memory_budget_gib",
                    self.memory_budget_gib,
                    "must be None (no budget) or a finite number of GiB > 0",
                ) from None
        self.step_rule = _check_enum("step_rule", self.step_rule, StepRule)
        if self.inv_update_steps % self.factor_update_steps != 0:
            warnings.warn(
                f"inv_update_steps={self.inv_update_steps} is not a multiple of "
                f"factor_update_steps={self.factor_update_steps}: some decompositions will be "
                "recomputed from factors that have not changed since the last one.",
                UserWarning,
                stacklevel=3,
            )

    def _check_damping_over_time(self) -> None:
        """Schedule / adaptive-damping options (core/damping.py) and their cross-checks."""
        self.damping_schedule = _check_enum(
            "damping_schedule", self.damping_schedule, DampingSchedule
        )
        self.damping_decay = _check_float("damping_decay", self.damping_decay, low=0.0, high=1.0)
        self.damping_step_size = _check_int("damping_step_size", self.damping_step_size, low=1)
        if not isinstance(self.adaptive_damping, bool):
            raise _invalid("adaptive_damping", self.adaptive_damping, "must be true or false")
        self.adaptive_damping_interval = _check_int(
            "adaptive_damping_interval", self.adaptive_damping_interval, low=1
        )
        if self.adaptive_damping_factor is not None:
            self.adaptive_damping_factor = _check_float(
                "adaptive_damping_factor",
                self.adaptive_damping_factor,
                low=0.0,
                high=1.0,
                high_inclusive=False,
            )
        self.min_damping = _check_float(
            "min_damping", self.min_damping, low=0.0, low_inclusive=True
        )
        if self.max_damping is not None:
            self.max_damping = _check_float("max_damping", self.max_damping, low=self.min_damping)
        high = math.inf if self.max_damping is None else self.max_damping
        if not self.min_damping <= self.damping <= high:
            raise _invalid(
                "damping",
                self.damping,
                f"must lie within [min_damping, max_damping] = [{self.min_damping:g}, {high:g}]",
            )
        if self.adaptive_damping and self.damping_schedule != DampingSchedule.CONSTANT:
            raise _invalid(
                "damping_schedule",
                self.damping_schedule.value,
                "must be 'constant' when adaptive_damping=True (a schedule and the "
                "adaptation would both set the damping)",
            )
        if self.adaptive_damping and self.loss_reduction == LossReduction.SUM:
            raise _invalid(
                "loss_reduction",
                self.loss_reduction.value,
                "must be 'mean' when adaptive_damping=True (the quadratic model uses "
                "the K-FAC curvature of the mean loss)",
            )

    @staticmethod
    def _check_overrides(value: Any) -> list[dict[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise _invalid("layer_overrides", value, "must be a list of dicts with a 'regex' key")
        checked = []
        for i, item in enumerate(value):
            name = f"layer_overrides[{i}]"
            if not isinstance(item, Mapping) or "regex" not in item:
                raise _invalid(name, item, "must be a dict with a 'regex' key")
            unknown = set(item) - _OVERRIDE_KEYS
            if unknown:
                raise _invalid(
                    name,
                    item,
                    f"has unknown keys {sorted(unknown)}; allowed keys are "
                    f"{sorted(_OVERRIDE_KEYS)}",
                )
            entry = dict(item)
            entry["regex"] = _check_regex_list(f"{name}.regex", entry["regex"])[0]
            if "damping" in entry:
                entry["damping"] = _check_float(f"{name}.damping", entry["damping"], low=0.0)
            for key in ("factor_update_steps", "inv_update_steps"):
                if key in entry:
                    entry[key] = _check_int(f"{name}.{key}", entry[key], low=1)
            if "max_dense_dim" in entry:
                entry["max_dense_dim"] = _check_int(
                    f"{name}.max_dense_dim", entry["max_dense_dim"], low=0
                )
            for key in ("a_structure", "g_structure"):  # names checked against the registry
                if key in entry and not isinstance(entry[key], str):  # when the block is built
                    raise _invalid(
                        f"{name}.{key}",
                        entry[key],
                        "must be a factor structure name "
                        "('dense', 'diagonal', 'isotropic' or a registered one)",
                    )
            if "compute_method" in entry:
                method = entry["compute_method"]
                if not (isinstance(method, str) and method.lower() == "skip"):
                    entry["compute_method"] = str(_check_method(f"{name}.compute_method", method))
                else:
                    entry["compute_method"] = "skip"
            checked.append(entry)
        return checked

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (enums as strings), suitable for checkpoints and logging."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, list):
                value = [dict(v) if isinstance(v, Mapping) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_any(cls, config: Any = None, **options: Any) -> KFACConfig:
        """Build a config from a KFACConfig, a mapping (e.g. a Hydra DictConfig) and/or keywords."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise _unknown_options(unknown, allowed)
        if config is None:
            return cls(**options)
        if isinstance(config, cls):
            return dataclasses.replace(config, **options) if options else config
        if isinstance(config, Mapping) or hasattr(config, "items"):
            merged = {k: v for k, v in dict(config.items()).items() if not str(k).startswith("_")}
            merged.update(options)
            unknown = sorted(set(merged) - set(allowed))
            if unknown:
                raise _unknown_options(unknown, allowed)
            return cls(**merged)
        raise ValueError(f"Invalid config={config!r}: must be a KFACConfig, a mapping or None.")
