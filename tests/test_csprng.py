"""The OS-CSPRNG noise source: its distribution against the normal and uniform laws, fresh draws,
and secure_mode end to end (noise and sampling, named in every metrics line)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.config import load_config
from fedslm.errors import ConfigError
from fedslm.privacy import csprng


def test_uniforms_are_uniform_on_the_unit_interval():
    u = csprng.uniform(200_000)
    assert u.min() > 0 and u.max() <= 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_normals_follow_the_standard_normal():
    z = csprng.standard_normal(200_001)
    assert z.shape == (200_001,)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(stats.kurtosis(z)) < 0.05  # tails of a normal, not of a uniform or a mixture


def test_smoothed_gaussian_has_the_requested_std_and_fresh_draws():
    ref = torch.zeros(300, 400)
    a = csprng.gaussian_like(ref, 0.7)
    b = csprng.gaussian_like(ref, 0.7)
    assert a.shape == ref.shape and a.dtype == ref.dtype
    assert float(a.std()) == pytest.approx(0.7, rel=0.02)
    assert stats.kstest(a.flatten().double().numpy() / 0.7, "norm").pvalue > 1e-3
    assert not torch.equal(a, b)  # nothing seeded: every call is new
    assert torch.equal(csprng.gaussian_like(ref, 0.0), ref)


def test_poisson_mask_rate():
    rate = float(np.mean([csprng.poisson_mask(1000, 0.03).sum() for _ in range(200)])) / 1000
    assert rate == pytest.approx(0.03, rel=0.05)


def test_secure_mode_trains_and_names_its_noise_source(tiny_bert_dir, class_csv, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", f"model.name={tiny_bert_dir}", "model.max_length=16", f"data.source={class_csv}", "lora.r=2",
        "train.batch_size=16", "train.physical_batch_size=8", "train.local_steps=2", "federation.rounds=1",
        "privacy.secure_mode=true", f"output.dir={out}"])
    assert res.exit_code == 0, res.output
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["noise_source"] == csprng.SOURCE and "cryptographically secure" in line["noise_source"]


def test_secure_mode_refuses_a_noise_seed():
    with pytest.raises(ConfigError, match="privacy.secure_mode=true .* privacy.noise_seed=3"):
        load_config(overrides=["privacy.secure_mode=true", "privacy.noise_seed=3"])
