"""The one-run audit: its statistics against the binomial law, and both directions that make an audit
worth having: a DP run's bound stays at or below its claimed ε, a non-private run that memorises gets a
bound well above it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
from typer.testing import CliRunner

from fedslm.audit import epsilon_lower_bound, p_value
from fedslm.cli.main import app

WORDS = [f"w{i}" for i in range(400)]


def test_p_value_is_the_binomial_tail_when_delta_is_zero():
    for eps in (0.0, 0.5, 2.0):
        q = math.exp(eps) / (1 + math.exp(eps))
        assert p_value(100, 30, 24, eps) == pytest.approx(stats.binom.sf(23, 30, q))


def test_lower_bound_is_the_largest_epsilon_rejected():
    m, r, v = 1000, 100, 90
    bound = epsilon_lower_bound(m, r, v, confidence=0.95)
    assert p_value(m, r, v, bound * 0.999) < 0.05 <= p_value(m, r, v, bound * 1.001)
    assert epsilon_lower_bound(m, r, 50) == 0.0  # chance-level guessing rules nothing out
    assert epsilon_lower_bound(m, r, v, delta=1e-5) <= bound  # a δ term can only weaken the bound
    # With every guess right the bound is as large as r allows: q^r = 0.05.
    assert epsilon_lower_bound(m, 40, 40) == pytest.approx(math.log(0.05 ** (1 / 40) / (1 - 0.05 ** (1 / 40))),
                                                           rel=1e-6)


@pytest.fixture(scope="module")
def memorising_setup(tmp_path_factory):
    """A small BERT with a 400-word vocabulary (so canaries are distinct) and 150 records in 3 classes."""
    tmp = tmp_path_factory.mktemp("audit")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, pad_token_id=0)).save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(150):
        label = i % 3
        lines.append(" ".join(WORDS[j] for j in rng.integers(label * 100, label * 100 + 100, 6)) + f",{'abc'[label]}")
    (tmp / "records.csv").write_text("text,label\n" + "\n".join(lines) + "\n")
    return tmp


def _audit(setup, *extra):
    out = setup / f"out-{len(list(setup.iterdir()))}"
    res = CliRunner().invoke(app, [
        "audit", "--canaries", "400", "--seed", "1", f"model.name={setup / 'model'}", "model.max_length=16",
        f"data.source={setup / 'records.csv'}", "lora.r=16", "lora.alpha=32", "train.batch_size=32",
        "train.physical_batch_size=32", "train.local_steps=1200", "federation.rounds=1", "train.lr=0.01",
        f"output.dir={out}", *extra])
    assert res.exit_code == 0, res.output
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "audit.json").read_text())


def test_audit_finds_memorisation_without_dp_and_stays_under_the_claim_with_dp(memorising_setup):
    plain = _audit(memorising_setup, "privacy.enabled=false")
    private = _audit(memorising_setup, "privacy.target_epsilon=1")
    assert plain["claimed_epsilon"] is None
    # Memorised canaries are told apart. Sampling is unseeded, so this varies: over 6 runs here, 70–77 of
    # 80 guesses were right (bounds 1.30–2.13); 400 canaries and 1,200 steps keep the bound clear of 1.
    assert plain["correct"] >= 0.8 * plain["guesses"]
    assert plain["epsilon_lower_bound"] > 1.0  # a non-private run is caught above ε = 1
    assert 0.99 < private["claimed_epsilon"] <= 1.0 + 1e-9  # calibrated to the target, never above it
    assert private["epsilon_lower_bound"] <= private["claimed_epsilon"]
    assert private["epsilon_lower_bound"] < plain["epsilon_lower_bound"]
