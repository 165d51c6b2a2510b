"""Config: typed defaults, YAML + overrides, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.config import load_config
from fedslm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

REQUIRED_KEYS = [
    "model.name", "model.task", "model.max_length", "lora.r", "lora.alpha", "lora.target_modules",
    "data.source", "data.text_column", "data.label_column", "privacy.enabled", "privacy.target_epsilon",
    "privacy.delta", "privacy.max_grad_norm", "privacy.max_epsilon", "privacy.ledger", "train.batch_size",
    "train.local_steps", "train.lr", "train.seed", "federation.num_clients", "federation.rounds",
]


def test_required_keys_exist():
    cfg = load_config()
    for key in REQUIRED_KEYS:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config([path])


def test_files_then_overrides_merge_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("privacy:\n  target_epsilon: 3\ntrain:\n  lr: 0.01\n")
    b = tmp_path / "b.yaml"
    b.write_text("privacy:\n  target_epsilon: 1\n")
    cfg = load_config([a, b], ["train.lr=0.5", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.privacy.target_epsilon == 1.0
    assert cfg.train.lr == 0.5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("privacy.target_epsilon=-1", "privacy.target_epsilon must be > 0, got -1"),
        ("model.task=regression", "model.task must be one of classification, causal_lm; got 'regression'"),
        ("train.batch_size=abc", "train.batch_size: bad value 'abc'"),
        ("train.batch_size=0", "train.batch_size must be > 0, got 0"),
        ("privacy.delta=1.5", "privacy.delta must be in (0, 1), got 1.5"),
        ("privacy.accountant=gdp", "privacy.accountant must be one of rdp, prv; got 'gdp'"),
        ("train.optimizer=lion", "train.optimizer must be one of adamw, sgd; got 'lion'"),
        ("model.foo=1", "unknown key 'model.foo' (in command line); allowed here: name, task"),
        ("nosuch.key=1", "unknown key 'nosuch'"),
        ("lora.r", "override 'lora.r' is not key=value"),
        ("data.labels=[a]", "data.labels must list at least 2 labels"),
        ("federation.rounds=0", "federation.rounds must be > 0, got 0"),
        ("model.pooling=max", "model.pooling must be one of cls, mean; got 'max'"),
        ("model.classifier_dropout=1.0", "model.classifier_dropout must be in [0, 1), got 1.0"),
        ("lora.head_bias=maybe", "lora.head_bias"),
        ("model.task=causal_lm lora.head_bias=false", "lora.head_bias: false applies to model.task 'classification'"),
        ("model.task=causal_lm model.classifier_dropout=0", "model.classifier_dropout applies to model.task"),
        ("model.task=causal_lm model.pooling=mean", "model.pooling 'mean' applies to model.task 'classification' only"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=override.split())
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_file_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  local_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.local_stepz' \(in .*bad.yaml\)"):
        load_config([bad])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])


def test_cli_prints_one_line_not_a_traceback():
    res = CliRunner().invoke(app, ["train", "privacy.target_epsilon=-1"])
    assert res.exit_code == 2
    assert res.output.strip() == "error: privacy.target_epsilon must be > 0, got -1.0"


def test_config_show_prints_resolved_yaml():
    res = CliRunner().invoke(app, ["config", "show", "privacy.target_epsilon=3"])
    assert res.exit_code == 0
    assert "target_epsilon: 3.0" in res.stdout


def test_registries_reject_duplicates():
    from fedslm.data.tasks import TASKS
    from fedslm.coordinator.server import STRATEGIES
    from fedslm.registry import Registry

    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a", 2)
    with pytest.raises(KeyError, match="no thing 'b'; known: a"):
        reg["b"]
    with pytest.raises(ValueError, match="already registered"):
        STRATEGIES.register("fedavg", object)
    assert TASKS.names() == ["causal_lm", "classification"]
