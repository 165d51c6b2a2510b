"""model.pooling=mean: the head reads the masked mean of the token vectors, padding never counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedslm.errors import ModelError
from fedslm.lora import get_adapter_state, save_adapter
from fedslm.lora.adapter import adapter_meta
from fedslm.lora.merge import export_merged, load_tuned
from fedslm.models.pooling import use_mean_pooling
from fedslm.privacy import Ledger
from fedslm.train import round_spec, build_node, evaluate, ledger_path, train_round


@torch.no_grad()
def test_head_reads_the_masked_mean_and_padding_changes_nothing(cls_config):
    node = build_node(cls_config("model.pooling=mean"))
    model, tok = node.model.eval(), node.base.tokenizer
    texts = ["alpha beta", "gamma delta epsilon zeta eta theta iota kappa"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert enc["attention_mask"][0].sum() < enc["attention_mask"].shape[1]  # the first text is padded
    logits = model(**enc).logits
    # Reference by hand: the encoder's token vectors, averaged over the real tokens, through the head.
    base = node.base.model
    hidden = base.bert(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * m).sum(1) / m.sum(1)
    assert torch.allclose(logits, base.classifier(mean), atol=1e-5)
    alone = model(**tok(texts[:1], return_tensors="pt")).logits
    assert torch.allclose(alone[0], logits[0], atol=1e-5)
    # The [CLS] pooler reads something else.
    cls_node = build_node(cls_config())
    assert not torch.allclose(cls_node.model.eval()(**enc).logits, logits, atol=1e-3)


def test_mean_pooled_head_trains_under_dp_and_survives_the_adapter_folder(cls_config, tmp_path):
    cfg = cls_config("model.pooling=mean")
    node = build_node(cfg)
    assert not any("pooler" in k for k in get_adapter_state(node.model))
    before = get_adapter_state(node.model)
    train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=Ledger(ledger_path(cfg)))
    after = get_adapter_state(node.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    folder = save_adapter(node.model, tmp_path / "adapter",
                          adapter_meta(cfg, node.base.fingerprint, list(node.data.labels)))
    tuned = load_tuned(folder)
    assert tuned.meta["pooling"] == "mean"
    ref = evaluate(node.model, node.test, "classification")
    assert evaluate(tuned.model, node.test, "classification")["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    with pytest.raises(ModelError, match="model.pooling 'mean'"):
        export_merged(folder, tmp_path / "merged")


def test_mean_pooling_needs_an_encoder_with_a_pooler():
    with pytest.raises(ModelError, match="needs an encoder classifier with a pooler"):
        use_mean_pooling(nn.Linear(4, 2))
