"""Tiny models built from config in process, and small data files; no network, no bundled weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from flwr.supercore.task_identity import TaskIdentity

from fedslm.config import load_config

WORDS = (
    "fever cough rash fracture arm leg chest pain infection acute chronic heart lung skin bone "
    "left right upper lower severe mild the of with due to and unspecified injury disease code"
).split()

# Three clearly separable classes for the classification fixtures.
CLASS_WORDS = {
    "cardio": ["heart", "chest", "pain"],
    "resp": ["lung", "cough", "fever"],
    "ortho": ["fracture", "bone", "arm", "leg"],
}


def _tokenizer(specials: list[str], *, bert: bool) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A BERT-style encoder checkpoint without a head (like MiniLM): the head is initialised on load."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = _tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], bert=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tokenizer(["<pad>", "[UNK]", "<s>", "</s>"], bert=False)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    """The Gemma-3 text architecture (as in gemma3-270m: GQA, q/k norms, sliding window, tied embeddings)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("tiny-gemma")
    tokenizer = _tokenizer(["<pad>", "[UNK]", "<s>", "</s>"], bert=False)
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True,
    )
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _class_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    gen = torch.Generator().manual_seed(seed)
    labels = sorted(CLASS_WORDS)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = CLASS_WORDS[label]
        k = 2 + int(torch.randint(0, 4, (1,), generator=gen))
        picks = [words[int(j)] for j in torch.randint(0, len(words), (k,), generator=gen)]
        filler = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (int(torch.randint(0, 3, (1,), generator=gen)),), generator=gen)]
        rows.append({"text": " ".join(picks + filler), "label": label})
    return rows


@pytest.fixture
def class_csv(tmp_path) -> Path:
    path = tmp_path / "records.csv"
    lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in _class_rows(120)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def causal_jsonl(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    rows = []
    for i, r in enumerate(_class_rows(60, seed=1)):
        rows.append({"prompt": f"{r['text']} code", "completion": " ".join(CLASS_WORDS[r["label"]][: 1 + i % 3])})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def cls_config(tiny_bert_dir, class_csv, tmp_path):
    def make(*overrides: str):
        return load_config(overrides=[
            f"model.name={tiny_bert_dir}", "model.max_length=16", f"data.source={class_csv}",
            "lora.r=2", "lora.alpha=4", "train.batch_size=16", "train.physical_batch_size=8",
            "train.local_steps=3", "federation.rounds=2", f"output.dir={tmp_path / 'run'}",
            # fp32 vectors on every machine: tests compare cached and uncached models exactly (bf16 vectors,
            # model.feature_precision=auto on a CPU with native bf16, are tested on their own).
            "privacy.noise_seed=7", "model.feature_precision=fp32", *overrides,
        ])
    return make


@pytest.fixture
def causal_config(tiny_llama_dir, causal_jsonl, tmp_path):
    def make(*overrides: str):
        return load_config(overrides=[
            f"model.name={tiny_llama_dir}", "model.task=causal_lm", "model.max_length=16",
            f"data.source={causal_jsonl}", "lora.r=2", "lora.alpha=4", "train.batch_size=8",
            "train.physical_batch_size=4", "train.local_steps=3", "federation.rounds=2",
            f"output.dir={tmp_path / 'run'}", "privacy.noise_seed=7", *overrides,
        ])
    return make


@pytest.fixture(autouse=True)
def simulated_machine(monkeypatch):
    """In-process tests call the ClientApp with simulation node configs (partition-id), as Flower's
    simulation engine does: mark this machine as a simulation, as `fedslm simulate` does. Tests of a
    deployed node name a policy, which wins; the refusal of a bare partition-id deletes the flag."""
    monkeypatch.setenv("FEDSLM_SIMULATION", "1")


@pytest.fixture(autouse=True)
def feature_cache(tmp_path_factory, monkeypatch):
    """Frozen-prefix caches (lora.layers) go to this session's temporary folder, never ~/.cache."""
    monkeypatch.setenv("FEDSLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "feature-cache"))


@pytest.fixture
def own_feature_cache(tmp_path, monkeypatch):
    """A test's own feature-cache folder and an empty in-process cache (``pytestmark`` of the cache tests)."""
    from fedslm.train import feature_pool, prefix

    monkeypatch.setenv(prefix.CACHE_ENV, str(tmp_path / "cache"))
    prefix._MEMORY.clear()
    feature_pool._LAST_POOL.clear()
    yield
    prefix._MEMORY.clear()
    feature_pool._LAST_POOL.clear()


def randomise_lora(model, seed: int = 1, which: str = "lora_") -> None:
    """Trainable tensors whose names hold ``which`` drawn at random (std 0.3): a fresh LoRA's B is zero, so
    its gradients and outputs would not test anything. ``lora_B``: B alone (a layer's inert LoRA stays)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if which in name and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture
def flower_identity():
    """Messages need the process' task identity, as Flower's runtimes set it."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def node_policy(tmp_path):
    """Write a deployed node's policy: its data, ledger and caps; ``cfg`` (the coordinator's config)
    names the base model the institution allows."""
    import yaml

    def make(cfg=None, *, data, name="h0", ledger=None, max_epsilon=8.0, max_delta=1e-4, min_test_records=1,
             models=None, path=None, labels=tuple(sorted(CLASS_WORDS)), size_is_public=False, size_floor=None,
             **privacy):
        allowed = models if models is not None else [cfg.model.name if cfg is not None else "minilm"]
        policy = {
            "name": name,
            "data": {"source": str(data), "min_test_records": min_test_records, "size_is_public": size_is_public,
                     "labels": list(labels) if labels is not None else None, "size_floor": size_floor},
            "privacy": {"ledger": str(ledger or tmp_path / f"{name}.ledger.json"), "max_epsilon": max_epsilon,
                        "max_delta": max_delta, **privacy},
            "models": {"allowed": [str(m) for m in allowed]},
        }
        out = Path(path or tmp_path / f"{name}.policy.yaml")
        out.write_text(yaml.safe_dump(policy), encoding="utf-8")
        return out

    return make
