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


def fixed_test(cfg: Config, adapter_dir: Path) -> Optional[dict[str, Any]]:
    """The global adapter scored on the bundled dataset's fixed test split (never trained on: the
    institutions share its training split only), or None for a dataset without one. In a simulation
    the researcher holds every record, so this is exact, not a DP release."""
    from fedslm.data import bundled, load_task_data
    from fedslm.data.tasks import get_task
    from fedslm.lora.merge import load_tuned

    if bundled.get(cfg.data.source) is None or cfg.model.task != "classification":
        return None
    import dataclasses

    # The whole fixed split: data.max_test_records caps what each institution scores, not this.
    data = load_task_data(dataclasses.replace(cfg.data, max_test_records=None, max_train_records=None),
                          cfg.model.task)
    if not data.test:
        return None
    tuned = load_tuned(adapter_dir)
    enc = get_task(cfg.model.task).encode(data.test, tuned.base.tokenizer, cfg.model.max_length)
    feats = split_features(tuned.model, tuned.base.fingerprint, enc, cfg.model, cfg.lora.layers)
    ev = evaluate(tuned.model, enc, cfg.model.task, cfg.train.eval_batch_size, features=feats)
    return {"accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"], "records": ev["num_examples"]}


def institution_confusions(cfg: Config, adapter_dir: Path) -> Optional[dict[str, Any]]:
    """The global adapter's confusion counts (counts[gold][predicted]) on each institution's held-out
    records, and its per-class accuracy there: which classes each institution's skew hurts. Exact, as
    the researcher holds every record in a simulation; a deployed node never sends per-class counts."""
    if cfg.model.task != "classification":
        return None
    from fedslm.data.tasks import get_task
    from fedslm.lora.merge import load_tuned
    from fedslm.node.serve import institution_task_data
    from fedslm.train.evaluate import confusion

    tuned = load_tuned(adapter_dir)
    labels = list(tuned.meta["labels"])
    out: dict[str, Any] = {"labels": labels, "per_institution": {}}
    for inst in range(cfg.federation.num_clients):
        node = NodeContext(institution=inst, num_institutions=cfg.federation.num_clients, policy=None)
        data = institution_task_data(plan_round(cfg, node), for_training=False)
        test = get_task(cfg.model.task).encode(data.test, tuned.base.tokenizer, cfg.model.max_length)
        feats = split_features(tuned.model, tuned.base.fingerprint, test, cfg.model, cfg.lora.layers)
        counts = confusion(tuned.model, test, len(labels), cfg.train.eval_batch_size, features=feats)
        out["per_institution"][str(inst)] = {
            "confusion": counts,
            "per_class_accuracy": [row[c] / sum(row) if sum(row) else None for c, row in enumerate(counts)],
            "per_class_records": [sum(row) for row in counts],
        }
    return out


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
