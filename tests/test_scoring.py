"""A simulation's final scoring (fedslm.simulation.scoring): prepared before the adapter exists, it
gives what scoring the saved adapter from scratch through the whole model gives."""

from __future__ import annotations

import pytest

from fedslm.data.tasks import get_task
from fedslm.errors import ModelError
from fedslm.lora import adapter_meta, save_adapter
from fedslm.lora.merge import load_tuned
from fedslm.models import load_base
from fedslm.node.plan import NodeContext, plan_round
from fedslm.node.serve import institution_task_data
from fedslm.privacy import Ledger
from fedslm.simulation import scoring
from fedslm.train.evaluate import confusion
from fedslm.train.local import round_spec, train_round
from fedslm.train.node import build_node


@pytest.mark.parametrize("layers", [0, 1])
def test_prepared_scores_equal_the_adapter_scored_from_scratch(cls_config, tmp_path, layers):
    cfg = cls_config("model.pooling=mean", f"lora.layers={layers}", "federation.num_clients=2")
    node = build_node(cfg)
    train_round(node.model, node.train, round_spec(cfg), unit="u", ledger=Ledger(tmp_path / "l.json"),
                features=node.train_features)
    labels = list(node.data.labels)
    # Prepared first: its prefix vectors come from the base alone, before any adapter exists.
    prepared = scoring.prepare(cfg)
    adapter = save_adapter(node.model, tmp_path / "adapter", adapter_meta(cfg, node.base.fingerprint, labels))
    fixed, per_class = scoring.score(prepared, adapter)
    assert fixed is None  # not a bundled dataset: no fixed test split
    assert per_class["labels"] == labels
    tuned = load_tuned(adapter)
    for inst in range(2):
        ctx = NodeContext(institution=inst, num_institutions=2, policy=None)
        test = institution_task_data(plan_round(cfg, ctx), for_training=False).test
        enc = get_task("classification").encode(test, tuned.base.tokenizer, cfg.model.max_length)
        expected = confusion(tuned.model, enc, len(labels))  # every layer, from the tokens
        got = per_class["per_institution"][str(inst)]
        assert got["confusion"] == expected and sum(got["per_class_records"]) == len(test)


def test_a_base_loaded_elsewhere_must_be_the_adapters(cls_config, tmp_path):
    cfg = cls_config("model.pooling=mean", "lora.layers=0")
    node = build_node(cfg)
    adapter = save_adapter(node.model, tmp_path / "adapter",
                           adapter_meta(cfg, node.base.fingerprint, list(node.data.labels)))
    other = load_base(cls_config("model.pooling=mean", "model.init_seed=5").model, len(node.data.labels))
    assert other.fingerprint != node.base.fingerprint
    with pytest.raises(ModelError, match="refusing to combine"):
        load_tuned(adapter, base=other)


def test_an_adapter_trained_with_other_tokens_or_pooling_is_not_scored_on_the_prepared_records(cls_config, tmp_path):
    cfg = cls_config("model.pooling=mean", "lora.layers=0", "federation.num_clients=2")
    node = build_node(cfg)
    prepared = scoring.prepare(cfg)
    other = cls_config("model.pooling=mean", "lora.layers=0", "model.max_length=12")
    adapter = save_adapter(node.model, tmp_path / "adapter",
                           adapter_meta(other, node.base.fingerprint, list(node.data.labels)))
    with pytest.raises(ModelError, match="max_length=12"):
        scoring.score(prepared, adapter)
