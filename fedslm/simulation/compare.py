"""What each simulated institution would reach training alone, under the same ε.

Each institution trains a fresh adapter (same base, same LoRA start) on its own
partition for the same rounds × local steps, with its own ledger under
``ledgers-local/`` (a separate, counterfactual budget), and is scored on the same
held-out records as in the federation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

from fedslm.config import Config
from fedslm.node.plan import NodeContext, plan_round
from fedslm.node.serve import build_institution
from fedslm.privacy import Ledger
from fedslm.train.evaluate import evaluate
from fedslm.train.local import train_round
from fedslm.wire.codec import Request
from fedslm.lora.prior import apply_label_prior
from fedslm.train.prefix import split_features


def local_baselines(cfg: Config, progress: Optional[Callable[[int], None]] = None) -> dict[str, dict[str, Any]]:
    out = Path(cfg.output.dir)
    headline = "accuracy" if cfg.model.task == "classification" else "perplexity"
    results: dict[str, Any] = {}
    for inst in range(cfg.federation.num_clients):
        node = NodeContext(institution=inst, num_institutions=cfg.federation.num_clients, policy=None)
        plan = dataclasses.replace(plan_round(cfg, node), ledger=out / "ledgers-local" / f"{node.name}.json")
        # No coordinator: a fresh adapter from the same seed, nothing to check the base against.
        request = Request(server_round=0, config_yaml="", base_fingerprint="", run_id="local-only",
                          proximal_mu=0.0, adapter=None, bytes_down=0)
        built = build_institution(plan, request)
        if cfg.model.head_init == "label-names" and built.data.labels is not None:
            apply_label_prior(built.model, built.base.tokenizer, built.data.labels, cfg.model)
        train_f, test_f = (split_features(built.model, built.base.fingerprint, enc, cfg.model, cfg.lora.layers)
                           for enc in (built.train, built.test))
        ledger = Ledger(plan.ledger)
        for r in range(1, cfg.federation.rounds + 1):
            train_round(built.model, built.train, plan.spec, unit=plan.unit, ledger=ledger,
                        run_id="local-only", round_idx=r, features=train_f)
        ev = evaluate(built.model, built.test, cfg.model.task, cfg.train.eval_batch_size, features=test_f)
        results[str(inst)] = ev.get(headline)
        if progress is not None:
            progress(inst)
    return {headline: results}
