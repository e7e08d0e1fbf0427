"""The Hydra config tree (conf/) and the structured K-FAC schema
(lightning_kfac/integrations/hydra.py).

Every option of every group is composed with ``initialize_config_dir`` + ``compose`` (no argv, no
chdir) and instantiated; the typo / wrong-type / out-of-range errors name the offending key.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from examples.data import load_digits_tensors
from examples.train import CONF_DIR, build_kfac_callback  # registers the schema
from lightning_kfac import KFACConfig
from lightning_kfac.integrations.hydra import KFACSchema

ROOT = Path(__file__).resolve().parents[2]

GROUPS = ("data", "model", "optimizer", "kfac", "trainer", "experiment")


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def full_message(exc: BaseException) -> str:
    """The exception's text and that of its causes (Hydra chains OmegaConf's errors)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def kfac_options(node) -> dict:
    return {k: v for k, v in OmegaConf.to_container(node).items() if not k.startswith("_")}


# -- the schema --------------------------------------------------------------------------------
def test_schema_mirrors_every_kfacconfig_field_and_default():
    schema = {f.name for f in dataclasses.fields(KFACSchema)}
    config = {f.name for f in dataclasses.fields(KFACConfig)}
    assert schema == config | {"_target_", "_convert_"}
    defaults = kfac_options(OmegaConf.structured(KFACSchema))
    assert defaults == KFACConfig().to_dict()


def test_default_preset_equals_kfacconfig_defaults_and_documents_every_option():
    cfg = compose_cfg("kfac=default")
    assert cfg.kfac._target_ == "lightning_kfac.KFACCallback"
    assert kfac_options(cfg.kfac) == KFACConfig().to_dict()
    text = (CONF_DIR / "kfac" / "default.yaml").read_text()
    undocumented = [
        name for name in KFACConfig().to_dict() if not re.search(rf"^{name}: .*# \S", text, re.M)
    ]
    assert undocumented == []


def test_every_yaml_field_has_a_comment():
    missing = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        for line in path.read_text().splitlines():
            field = re.match(r"^\s*[A-Za-z_][\w.]*:\s*\S", line)  # a key with a value
            if field and "#" not in line:
                missing.append(f"{path.relative_to(CONF_DIR)}: {line.strip()}")
    assert missing == []


# -- compose and instantiate every option of every group ----------------------------------------
def check_component(group, cfg, name):
    if group == "data":
        dm = instantiate(cfg.data)
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))
        n_train = len(dm.train_set)
        assert x.shape == (min(cfg.data.batch_size, n_train), 64) and y.dtype == torch.long
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        if cfg.data.train_size is None:
            assert n_train + len(dm.test_set) == 1797
    elif group == "model":
        model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
        x = load_digits_tensors()[0][:5]
        out_dim = 64 if name == "autoencoder" else 10
        assert model(x).shape == (5, out_dim)
        optimizer = model.configure_optimizers()
        assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    elif group == "optimizer":
        factory = instantiate(cfg.optimizer)
        optimizer = factory([torch.nn.Parameter(torch.zeros(3))])
        assert type(optimizer).__name__ == cfg.optimizer._target_.rsplit(".", 1)[-1]
        group0 = optimizer.param_groups[0]
        for key, value in cfg.optimizer.items():
            if not key.startswith("_"):
                assert group0[key] == (tuple(value) if key == "betas" else value), key
    elif group == "trainer":
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            pytest.skip("trainer=gpu needs a CUDA device to instantiate; composed and checked only")
        trainer = instantiate(cfg.trainer, logger=False)
        assert trainer.max_epochs == cfg.trainer.max_epochs
        assert trainer.num_devices == cfg.trainer.devices
        assert trainer.strategy.__class__.__name__ == {
            "ddp": "DDPStrategy",
            "ddp_spawn": "DDPStrategy",
        }.get(cfg.trainer.strategy, "SingleDeviceStrategy")
        if cfg.trainer.strategy == "ddp_spawn":
            assert trainer.strategy._start_method == "spawn"
    elif group == "kfac":
        callback = build_kfac_callback(cfg)
        if name == "off":
            assert cfg.kfac is None and callback is None
        else:
            assert type(callback).__name__ == "KFACCallback"
            assert callback.config.to_dict() == KFACConfig(**kfac_options(cfg.kfac)).to_dict()
            assert callback.config.damping == cfg.kfac.damping


@pytest.mark.parametrize("group,name", [(g, n) for g in GROUPS for n in options(g)])
def test_compose_and_instantiate_every_option(group, name):
    cfg = compose_cfg(f"{group}={name}")
    assert OmegaConf.select(cfg, "seed") == 0
    if group == "experiment":
        is_autoencoder = cfg.model._target_.endswith("DeepAutoencoder")
        check_component("data", cfg, cfg.data)
        check_component("model", cfg, "autoencoder" if is_autoencoder else "classifier")
        check_component("optimizer", cfg, None)
        check_component("kfac", cfg, "off" if cfg.kfac is None else "on")
    else:
        check_component(group, cfg, name)


def test_experiments_select_their_components_and_the_command_line_wins():
    assert compose_cfg("experiment=cnn").model._target_ == "examples.models.CNNClassifier"
    assert compose_cfg("experiment=classifier").model._target_ == "examples.models.MLPClassifier"
    cfg = compose_cfg("experiment=classifier", "kfac=off", "optimizer=adam")
    assert cfg.kfac is None and cfg.optimizer._target_ == "torch.optim.Adam"
    assert compose_cfg().model._target_ == "examples.models.DeepAutoencoder"  # the default


def test_presets_hold_their_papers_settings():
    m = compose_cfg("kfac=martens2015").kfac
    assert (
        m.compute_method,
        m.factor_decay,
        m.inv_update_steps,
        m.factor_update_steps,
        m.fisher_type,
        m.adaptive_damping,
        m.adaptive_damping_interval,
        m.step_rule,
        m.kl_clip,
    ) == ("inverse", 0.95, 20, 1, "mc", True, 5, "quadratic", None)
    k = compose_cfg("kfac=kaisa").kfac
    assert (k.factor_update_steps, k.inv_update_steps, k.kl_clip, k.damping, k.compute_method) == (
        10,
        100,
        1e-3,
        1e-3,
        "eigen",
    )


# What each preset composed to before the presets were reduced to their differences (every other
# option at its KFACConfig default): the presets must keep composing to exactly these configs.
PRESET_DIFFERENCES = {
    "default": {},
    "digits_autoencoder": {"damping": 1e-2, "output_reduction": "sum"},
    "digits_classifier": {"damping": 3e-2},
    "kaisa": {"distribute": "decompositions"},
    "martens2015": {
        "damping": 150.0,
        "factor_update_steps": 1,
        "inv_update_steps": 20,
        "kl_clip": None,
        "compute_method": "inverse",
        "fisher_type": "mc",
        "likelihood": "bernoulli",
        "output_reduction": "sum",
        "adaptive_damping": True,
        "min_damping": 1e-3,
        "step_rule": "quadratic",
    },
    "warm_start": {"damping": 0.1, "damping_mode": "relative", "factor_init": "identity"},
}


def test_every_kfac_preset_is_listed_with_its_differences():
    assert sorted([*PRESET_DIFFERENCES, "off"]) == options("kfac")


@pytest.mark.parametrize("preset", sorted(PRESET_DIFFERENCES))
def test_presets_compose_to_the_defaults_plus_their_differences(preset):
    cfg = compose_cfg(f"kfac={preset}").kfac
    assert (cfg._target_, cfg._convert_) == ("lightning_kfac.KFACCallback", "all")
    assert kfac_options(cfg) == {**KFACConfig().to_dict(), **PRESET_DIFFERENCES[preset]}


@pytest.mark.parametrize("preset", sorted(set(PRESET_DIFFERENCES) - {"default"}))
def test_presets_extend_default_and_state_only_their_differences(preset):
    """A preset lists ``default`` in its defaults list and states only the options it changes, so a
    new option edits ``config.py`` and ``conf/kfac/default.yaml`` only, never the presets."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "kfac" / f"{preset}.yaml"))
    assert raw.pop("defaults") == ["default", "_self_"]
    defaults = KFACConfig().to_dict()
    restated = sorted(name for name, value in raw.items() if value == defaults[name])
    assert restated == [], (
        f"conf/kfac/{preset}.yaml restates defaults {restated}: delete them "
        "(a preset states only what differs from conf/kfac/default.yaml)"
    )
    assert sorted(raw) == sorted(PRESET_DIFFERENCES[preset])


# -- errors name the offending key --------------------------------------------------------------
def test_typo_fails_at_composition_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("kfac.dampng=1")
    assert "kfac.dampng" in str(err.value)
    assert "Key 'dampng' not in 'KFACSchema'" in full_message(err.value)


def test_appended_typo_fails_when_the_callback_is_built_naming_the_key():
    cfg = compose_cfg("+kfac.dampng=1")  # `+` opens the struct; the callback still refuses it
    with pytest.raises(InstantiationException) as err:
        build_kfac_callback(cfg)
    assert "['dampng']" in full_message(err.value)


def test_wrong_type_fails_at_composition_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("kfac.factor_update_steps=abc")
    message = full_message(err.value)
    assert "kfac.factor_update_steps=abc" in message
    assert "Value 'abc' of type 'str' could not be converted to Integer" in message


@pytest.mark.parametrize(
    "override,expected",
    [
        ("kfac.damping=-1", "Invalid damping=-1.0"),
        ("kfac.factor_decay=1.5", "Invalid factor_decay=1.5"),
        ("kfac.compute_method=cholesky", "Invalid compute_method='cholesky'"),
    ],
)
def test_out_of_range_fails_when_the_callback_is_built_naming_the_option(override, expected):
    cfg = compose_cfg(override)  # composes: the schema checks keys and types, not ranges
    with pytest.raises(InstantiationException) as err:
        build_kfac_callback(cfg)
    assert expected in full_message(err.value)


def test_kfac_options_cannot_be_set_when_kfac_is_off():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("kfac=off", "kfac.damping=1e-2")
    assert "kfac.damping" in str(err.value)


# -- hydra stays out of `import lightning_kfac` -------------------------------------------------
def test_only_lightning_kfac_hydra_imports_hydra():
    package = ROOT / "lightning_kfac"
    importers = sorted(
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if re.search(r"^\s*(import hydra|from hydra\b)", p.read_text(), re.M)
    )
    assert importers == ["integrations/hydra.py"]
    code = (
        "import sys, lightning_kfac; lightning_kfac.KFACConfig(); "
        "print(sorted(m for m in sys.modules if m == 'hydra' or m.startswith('hydra.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
