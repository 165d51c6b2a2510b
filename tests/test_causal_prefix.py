"""The causal LM's frozen-prefix cache (lora.layers on Llama / Gemma-3) against the uncached model, the
obviously correct reference: same logits, same per-record losses and gradients, the same DP round and
evaluation; plus what the cache key depends on."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import randomise_lora
import torch

from fedslm.data.tasks import get_task
from fedslm.errors import ConfigError
from fedslm.lora import get_adapter_state
from fedslm.privacy import Ledger
from fedslm.train import causal_prefix, prefix
from fedslm.train.evaluate import evaluate, evaluation_counts
from fedslm.train.local import round_spec, train_round
from fedslm.train.losses import causal_lm_losses
from fedslm.train.node import build_node


pytestmark = pytest.mark.usefixtures("own_feature_cache")




def _cfg(causal_config, tiny_gemma_dir, arch, layers, *extra):
    model = [f"model.name={tiny_gemma_dir}"] if arch == "gemma3" else []
    return causal_config(*model, f"lora.layers={layers}", "lora.dropout=0.0", *extra)


def _padded_rows(enc, k=5):
    lengths = [len(ids) for ids in enc.input_ids]
    rows = sorted(range(len(lengths)), key=lambda i: lengths[i])[::max(1, len(lengths) // k)][:k]
    assert len({lengths[i] for i in rows}) > 1  # the batch pads
    assert max(lengths[i] for i in rows) > 4  # longer than the tiny Gemma's sliding window
    return rows


@pytest.mark.parametrize("arch,layers", [("llama", 1), ("llama", 2), ("gemma3", 1), ("gemma3", 2)])
def test_cached_logits_losses_and_per_record_gradients_equal_the_uncached_models(
        causal_config, tiny_gemma_dir, arch, layers):
    node = build_node(_cfg(causal_config, tiny_gemma_dir, arch, layers))
    model = node.model
    randomise_lora(model)
    feats = node.train_features
    assert isinstance(feats, causal_prefix.CausalFeatures) and feats.layers == layers
    assert len(feats) == len(node.train)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    total = causal_prefix.num_layers(model)
    assert adapted == {str(i) for i in range(total - layers, total)}  # LoRA on the top layers only
    model.train()
    rows = _padded_rows(node.train)
    batch = get_task("causal_lm").collate(node.train, rows)
    suffix = causal_prefix.CausalSuffix(model, layers)
    b = feats.batch(rows)
    assert b["hidden"].shape[1] == batch["input_ids"].shape[1]
    torch.testing.assert_close(b["labels"], batch["labels"])

    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    cached = suffix.logits(b["hidden"], b["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(cached[real], full[real], rtol=1e-5, atol=1e-5)

    ref, got = causal_lm_losses(model, batch), suffix(**b)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    for row in range(len(rows)):
        g_ref = torch.autograd.grad(ref[row], params, retain_graph=True)
        g_got = torch.autograd.grad(got[row], params, retain_graph=True)
        for a, c in zip(g_got, g_ref):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
        assert any(float(a.abs().sum()) > 0 for a in g_got)


@pytest.mark.parametrize("arch,mode", [("llama", "hooks"), ("gemma3", "hooks"), ("llama", "ghost")])
def test_a_dp_round_from_the_cache_is_the_uncached_round(causal_config, tiny_gemma_dir, tmp_path, arch, mode):
    states = []
    for use_cache in (False, True):
        cfg = _cfg(causal_config, tiny_gemma_dir, arch, 1, f"privacy.clipping_mode={mode}", "privacy.max_grad_norm=0.1",
                   "train.local_steps=2")
        node = build_node(cfg)
        randomise_lora(node.model)
        train_round(node.model, node.train, round_spec(cfg), unit="u", ledger=Ledger(tmp_path / f"{use_cache}.json"),
                    features=node.train_features if use_cache else None)
        states.append(get_adapter_state(node.model))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-6)


def test_evaluation_from_the_cache_is_the_uncached_evaluation(causal_config, tiny_gemma_dir):
    node = build_node(_cfg(causal_config, tiny_gemma_dir, "gemma3", 1))
    randomise_lora(node.model)
    assert node.test_features is not None
    whole = evaluate(node.model, node.test, "causal_lm", 8)
    cached = evaluate(node.model, node.test, "causal_lm", 8, features=node.test_features)
    assert cached["tokens"] == whole["tokens"] and cached["num_examples"] == whole["num_examples"]
    assert cached["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    counts = evaluation_counts(node.model, node.test, "causal_lm", 8, features=node.test_features)
    assert counts["loss_sum"] == pytest.approx(evaluation_counts(node.model, node.test, "causal_lm", 8)["loss_sum"],
                                               rel=1e-5)


def test_the_cache_key_names_base_cut_layout_and_each_records_tokens_and_targets(causal_config):
    node = build_node(causal_config("lora.layers=1"))
    enc = node.train
    key = causal_prefix.cache_key(enc, "fp", 1, {"m": 1})
    assert causal_prefix.cache_key(enc, "fp", 1, {"m": 1}) == key
    assert causal_prefix.cache_key(enc, "other", 1, {"m": 1}) != key
    assert causal_prefix.cache_key(enc, "fp", 2, {"m": 1}) != key
    assert causal_prefix.cache_key(enc, "fp", 1, {"m": 2}) != key
    import dataclasses

    ids = [list(x) for x in enc.input_ids]
    ids[3][-1] = ids[3][-1] + 1
    assert causal_prefix.cache_key(dataclasses.replace(enc, input_ids=ids), "fp", 1, {"m": 1}) != key
    targets = [list(t) for t in enc.targets]
    targets[0][-1] = -100
    assert causal_prefix.cache_key(dataclasses.replace(enc, targets=targets), "fp", 1, {"m": 1}) != key


def test_the_cache_file_is_private_and_read_back_instead_of_recomputed(causal_config, tmp_path, monkeypatch):
    cfg = causal_config("lora.layers=1")
    node = build_node(cfg)
    files = [f for f, _, _ in prefix.cache_files(tmp_path / "cache")]
    assert len(files) == 2  # train and test
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    prefix._MEMORY.clear()

    def no_compute(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(causal_prefix, "compute", no_compute)
    again = build_node(cfg)
    assert torch.equal(again.train_features.hidden, node.train_features.hidden)


def test_lora_layers_for_a_causal_lm_is_checked_and_named(causal_config):
    with pytest.raises(ConfigError, match="lora.layers must be >= 1 for model.task 'causal_lm'"):
        causal_config("lora.layers=0")
    with pytest.raises(ConfigError, match="lora.layers=3: this model has 2 decoder layers"):
        build_node(causal_config("lora.layers=3"))
