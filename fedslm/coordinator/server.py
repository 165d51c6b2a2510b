"""The coordinator's round loop: :func:`run_server` runs a configured federation on a Flower grid.

It resumes a run folder's checkpoint (:mod:`fedslm.coordinator.resume`), builds the strategy
(:mod:`fedslm.coordinator.strategy`), whose :class:`~fedslm.coordinator.record.RunRecorder` screens
every reply and writes ``metrics.jsonl`` and a checkpoint as rounds finish, then writes ``adapter/``,
``summary.json`` (:func:`summarize`), the model card, ``report.png`` and ``report.html``.

The coordinator holds no data: the label set of a classification task comes from the run config
(``data.labels``), which the simulation driver fills from the scenario's data before it starts.
The names of the modules above stay importable from here.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from flwr.app import ArrayRecord

from fedslm.config import Config, to_yaml
from fedslm.coordinator import warmup
from fedslm.coordinator.client_level import client_level_summary
from fedslm.coordinator.record import FederationStopped, RunRecorder
from fedslm.coordinator.resume import CHECKPOINT, Checkpoint, RunFolderError, find_checkpoint
from fedslm.coordinator.secagg import SecureAggregationGrid, secure_aggregation_summary
from fedslm.coordinator.strategy import ROBUST, STRATEGIES, Recording, make_strategies, make_strategy, robust_conflict
from fedslm.errors import ConfigError
from fedslm.lora import adapter_meta, get_adapter_state, save_adapter, set_adapter_state, wrap
from fedslm.lora.adapter import frozen_digest
from fedslm.models import load_base
from fedslm.privacy.dpsgd import check_secure_mode
from fedslm.report import FINISHED
from fedslm.wire import codec

__all__ = ["CHECKPOINT", "Checkpoint", "FederationStopped", "ROBUST", "STRATEGIES", "Recording", "RunFolderError",
           "RunRecorder", "find_checkpoint", "label_set", "make_strategies", "make_strategy", "robust_conflict",
           "run_server", "summarize"]

log = logging.getLogger("fedslm.server")


def label_set(cfg: Config) -> Optional[list[str]]:
    """The label set all nodes share, from the run config: the coordinator has no data to learn it from."""
    if cfg.model.task != "classification":
        return None
    if cfg.data.labels is not None:
        return list(cfg.data.labels)
    raise ConfigError("data.labels must list the label set every institution shares (the coordinator has no data)")


def run_server(grid: Any, cfg: Config, run_id: str, warming: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``federation.rounds`` rounds on ``grid`` and write the run folder. ``warming``: the ids of a
    simulation's warm-up messages (fedslm.coordinator.warmup), collected before the first exchange.

    A run folder holding a checkpoint of the same config is resumed after its last finished
    round, under its first run id, so nodes recognise rounds they already paid for.
    """
    out = Path(cfg.output.dir).expanduser().resolve()
    cfg.output.dir = str(out)  # absolute before it is sent: institutions' ledgers default to <output.dir>/ledgers
    out.mkdir(parents=True, exist_ok=True)
    log.warning("fedslm run folder: %s", out)
    resume = find_checkpoint(out, cfg)
    (out / FINISHED).unlink(missing_ok=True)
    config_yaml = to_yaml(cfg)
    (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    labels = label_set(cfg)
    base = load_base(cfg.model, len(labels) if labels is not None else None)
    model = wrap(base.model, cfg.lora, cfg.model.task, base.target_modules, seed=cfg.train.seed)
    if cfg.model.head_init == "label-names":
        from fedslm.lora.prior import apply_label_prior

        apply_label_prior(model, base.tokenizer, labels or [], cfg.model)
    initial = get_adapter_state(model)
    done = 0
    if resume is not None:
        run_id, done = resume.run_id, resume.round
        set_adapter_state(model, resume.adapter)  # checks keys and shapes against this config's adapter
        initial = get_adapter_state(model)
        log.warning("fedslm: resuming run %s after round %d of %d", run_id, done, cfg.federation.rounds)
    recorder = RunRecorder(cfg, out, run_id)
    recorder.restore(done if resume is not None else -1)
    outer, strategy = make_strategies(cfg, recorder)
    strategy.offset = done
    if resume is not None:
        strategy.load_strategy_state(resume.strategy_state)

    def checkpoint(rnd: int, arrays: ArrayRecord) -> None:
        if rnd > 0 or done == 0:
            recorder.checkpoint(rnd + done, arrays, strategy.strategy_state())

    if warming:
        warmup.finish(grid, warming)
    if cfg.federation.evaluate_initial and resume is None:  # round 0: every institution scores the base
        request = codec.request_config(config_yaml, base.fingerprint, run_id, frozen_digest(model))
        replies = grid.send_and_receive(strategy.configure_evaluate(0, codec.state_to_record(initial), request, grid),
                                        timeout=cfg.federation.round_timeout)
        strategy.aggregate_evaluate(0, replies)
    # A run resumed after its last round (it died before writing its summary) publishes what it would have.
    final = codec.record_to_state(strategy.published(codec.state_to_record(initial)))
    if cfg.federation.rounds > done:
        result = outer.start(
            grid=SecureAggregationGrid(grid, cfg, recorder) if cfg.federation.secure_aggregation else grid,
            initial_arrays=codec.state_to_record(initial), num_rounds=cfg.federation.rounds - done,
            timeout=cfg.federation.round_timeout,
            train_config=codec.request_config(config_yaml, base.fingerprint, run_id, frozen_digest(model)),
            evaluate_config=codec.request_config(config_yaml, base.fingerprint, run_id, frozen_digest(model)),
            evaluate_fn=checkpoint,
        )
        final = codec.record_to_state(strategy.published(result.arrays))
    set_adapter_state(model, final)
    save_adapter(model, out / "adapter", adapter_meta(cfg, base.fingerprint, labels))
    model_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
    summary = summarize(cfg, recorder.rounds, run_id, base.fingerprint, model_bytes, codec.tensor_bytes(final),
                        time.perf_counter() - recorder.started)
    if done:
        summary["resumed_after_round"] = done
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    from fedslm.lora.card import write_card

    write_card(out)  # adapter/README.md: the model card, every figure from summary.json
    from fedslm.report import write_report

    write_report(out)
    recorder.write_page()
    recorder.finish_tracking(summary)
    (out / FINISHED).write_text(run_id, encoding="utf-8")
    return summary


def summarize(cfg: Config, rounds: list[dict[str, Any]], run_id: str, fingerprint: str, model_bytes: int,
              adapter_bytes: int, wall: float) -> dict[str, Any]:
    last_eval: dict[int, dict[str, Any]] = {}
    privacy: dict[int, dict[str, Any]] = {}
    bytes_up = bytes_down = 0
    headline = "accuracy" if cfg.model.task == "classification" else "perplexity"
    initial = next((r for r in rounds if r["round"] == 0), None)
    rounds = [r for r in rounds if r["round"] > 0]
    for rec in rounds:
        for c in rec["clients"]:
            if "eval" in c:
                last_eval[c["institution"]] = c["eval"]
            if c.get("epsilon") is not None or "train_loss" in c:
                privacy[c["institution"]] = {"epsilon": c.get("epsilon"), "delta": c.get("delta"),
                                             **({"epsilon_alone": c["epsilon_alone"]} if "epsilon_alone" in c else {})}
            bytes_up += c.get("bytes_up", 0)
            bytes_down += c.get("bytes_down", 0)
    per_inst = {str(k): v.get(headline) for k, v in sorted(last_eval.items())}
    scored = {k: v for k, v in per_inst.items() if v is not None}
    worst = None
    if scored:
        pick = min if headline == "accuracy" else max
        key = pick(scored, key=scored.get)
        worst = {"institution": int(key), headline: scored[key]}
    return {
        "run_id": run_id,
        "rounds_completed": len([r for r in rounds if not r.get("stopped")]),
        "rounds_planned": cfg.federation.rounds,
        "strategy": cfg.federation.strategy,
        "institutions": cfg.federation.num_clients,
        "base_fingerprint": fingerprint,
        # The last round the institutions scored (federation.evaluate_every; a stopped round may have none).
        "final": next((r["eval_weighted"] for r in reversed(rounds) if r.get("eval_weighted")), {}),
        "per_institution": {headline: per_inst},
        **({"initial": {
            "weighted": initial["eval_weighted"],
            "per_institution": {headline: {str(c["institution"]): c["eval"].get(headline)
                                           for c in sorted(initial["clients"], key=lambda c: c["institution"])
                                           if "eval" in c}},
        }} if initial is not None else {}),
        "worst_institution": worst,
        "privacy": {
            "unit": "one record of one institution (example-level DP, per institution)",
            "per_institution": {str(k): v for k, v in sorted(privacy.items())},
            "noise_source": check_secure_mode(cfg.privacy.secure_mode) if cfg.privacy.enabled else "none (privacy disabled)",
            **({"client_level": client_level_summary(cfg, len([r for r in rounds if not r.get("stopped")]), rounds)}
               if cfg.privacy.client_level.enabled else {}),
            **({"secure_aggregation": secure_aggregation_summary(cfg, rounds)}
               if cfg.federation.secure_aggregation else {}),
        },
        "bytes": {"up_total": bytes_up, "down_total": bytes_down, "adapter": adapter_bytes, "base_model": model_bytes,
                  "adapter_over_model": adapter_bytes / model_bytes if model_bytes else None},
        "wall_seconds": wall,
    }
