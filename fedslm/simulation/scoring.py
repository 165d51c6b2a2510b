"""A simulation's global adapter scored where the researcher holds every record: on the bundled
dataset's fixed test split (never trained on: the institutions share its training split only) and on
each institution's held-out records, per class. Exact counts, not DP releases: a deployed node never
sends per-class counts.

Everything but the adapter is known before the last round: :func:`prepare` reads and tokenizes the
records, loads the base and looks up their frozen-prefix vectors while the rounds run;
:func:`score` then puts the final adapter on that base and scores from the vectors (a fraction of a
second instead of the ~2 s the whole took after the federation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fedslm.config import Config
from fedslm.data.tasks import Encoded, get_task
from fedslm.models import BaseModel, load_base
from fedslm.node.plan import NodeContext, plan_round
from fedslm.node.serve import institution_task_data
from fedslm.train.evaluate import confusion, evaluate
from fedslm.train.prefix import split_features


@dataclass
class Split:
    enc: Encoded
    features: Any  # the cached prefix (fedslm.train.prefix.Features), or None: scored through the model


@dataclass
class Prepared:
    cfg: Config
    base: BaseModel
    labels: list[str]
    fixed: Optional[Split]  # None: no fixed test split (not a bundled classification dataset)
    institutions: list[Split]


def prepare(cfg: Config) -> Optional[Prepared]:
    """The records and base scoring needs (None for a task other than classification)."""
    from fedslm.data import bundled, load_task_data

    if cfg.model.task != "classification":
        return None
    task = get_task(cfg.model.task)
    fixed_data = None
    if bundled.get(cfg.data.source) is not None:
        # The whole fixed split: data.max_test_records caps what each institution scores, not this.
        fixed_data = load_task_data(dataclasses.replace(cfg.data, max_test_records=None, max_train_records=None),
                                    cfg.model.task)
    tests = []
    for inst in range(cfg.federation.num_clients):
        node = NodeContext(institution=inst, num_institutions=cfg.federation.num_clients, policy=None)
        tests.append(institution_task_data(plan_round(cfg, node), for_training=False))
    labels = list(cfg.data.labels or (fixed_data or tests[0]).labels or [])
    base = load_base(cfg.model, len(labels))

    def split(records) -> Split:
        enc = task.encode(records, base.tokenizer, cfg.model.max_length)
        # The frozen prefix below any LoRA layer: the same before and after the adapter is loaded.
        return Split(enc, split_features(base.model, base.fingerprint, enc, cfg.model, cfg.lora.layers))

    fixed = split(fixed_data.test) if fixed_data is not None and fixed_data.test else None
    return Prepared(cfg, base, labels, fixed, [split(d.test) for d in tests])


def score(prepared: Prepared, adapter_dir: Path) -> tuple[Optional[dict[str, Any]], dict[str, Any]]:
    """(the fixed test split's accuracy, macro-F1 and size, or None; each institution's confusion counts
    counts[gold][predicted] and per-class accuracy) of the adapter in ``adapter_dir`` on the prepared base."""
    from fedslm.errors import ModelError
    from fedslm.lora.adapter import read_adapter_meta
    from fedslm.lora.merge import load_tuned

    cfg = prepared.cfg
    # The base's fingerprint covers its weights; what the records were tokenized and pooled with must match too.
    meta, m = read_adapter_meta(adapter_dir), cfg.model
    expected = {"model": m.name, "max_length": m.max_length, "pooling": m.pooling, "normalize": m.normalize}
    differ = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if differ:
        raise ModelError(f"{adapter_dir}: trained with {', '.join(f'{k}={a!r}' for k, (a, _) in differ.items())}, but "
                         f"scored with {', '.join(f'{k}={b!r}' for k, (_, b) in differ.items())}")
    tuned = load_tuned(adapter_dir, base=prepared.base)
    labels = list(tuned.meta["labels"])
    fixed = None
    if prepared.fixed is not None:
        ev = evaluate(tuned.model, prepared.fixed.enc, cfg.model.task, cfg.train.eval_batch_size,
                      features=prepared.fixed.features)
        fixed = {"accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"], "records": ev["num_examples"]}
    per: dict[str, Any] = {}
    for inst, split in enumerate(prepared.institutions):
        counts = confusion(tuned.model, split.enc, len(labels), cfg.train.eval_batch_size, features=split.features)
        per[str(inst)] = {
            "confusion": counts,
            "per_class_accuracy": [row[c] / sum(row) if sum(row) else None for c, row in enumerate(counts)],
            "per_class_records": [sum(row) for row in counts],
        }
    return fixed, {"labels": labels, "per_institution": per}
