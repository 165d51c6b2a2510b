"""``fedslm train``: one node fine-tuning on its own data, round after round.

Writes the run folder: ``config.yaml``, ``metrics.jsonl`` (one object per
round, appended as it ends, so a crash loses nothing finished), ``adapter/``
(a PEFT folder) and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedslm.config import Config, to_yaml
from fedslm.lora import adapter_meta, save_adapter
from fedslm.privacy import Ledger
from fedslm.train.evaluate import evaluate
from fedslm.train.local import ledger_path, privacy_plan, round_spec, train_round
from fedslm.train.node import build_node


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return None
    return value


def run_local(cfg: Config, console: Optional[Console] = None, device: str = "auto") -> dict[str, Any]:
    """``device``: auto, cpu, cuda, cuda:N or mps (``fedslm train --device``)."""
    from fedslm.train.device import resolve_device, resolve_precision

    console = console or Console()
    where = resolve_device(device, key="--device")
    precision = resolve_precision(cfg.train.precision, where)  # refused before anything is written
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    started = time.perf_counter()

    with console.status("loading model and data"):
        node = build_node(cfg, where)
    ledger = Ledger(ledger_path(cfg))
    console.print(
        f"[bold]{cfg.model.name}[/] ({cfg.model.task}) on [bold]{node.data.source}[/]: "
        f"{len(node.train)} training / {len(node.test)} held-out records; privacy unit {cfg.privacy.unit!r}; "
        f"on {where} ({precision})"
    )
    if cfg.privacy.enabled:
        pl = privacy_plan(round_spec(cfg), len(node.train))
        console.print(
            f"DP-SGD: σ={pl.noise_multiplier:.4f}, q={pl.sample_rate:.4g}, clip={cfg.privacy.max_grad_norm}, "
            f"planned ε={pl.epsilon:.3f} at δ={pl.delta:.3g} over {pl.rounds}×{pl.local_steps} steps; "
            f"ledger {ledger.path} (already spent ε={ledger.spent(cfg.privacy.unit, pl.delta, cfg.privacy.accountant):.3f})"
        )
    else:
        console.print("[yellow]privacy disabled: updates carry no DP guarantee (the ledger records ε=∞)[/]")

    spec = round_spec(cfg)
    metrics_path = out / "metrics.jsonl"
    before = evaluate(node.model, node.test, cfg.model.task, cfg.train.eval_batch_size, features=node.test_features)
    table = Table(title="local training")
    for col in ("round", "train loss", "eval loss", "accuracy" if cfg.model.task == "classification" else "perplexity", "ε spent", "s"):
        table.add_column(col, justify="right")
    table.add_row("0", "", f"{before['loss']:.4f}", _headline(before), "0", "")
    rounds: list[dict[str, Any]] = []
    with metrics_path.open("a", encoding="utf-8") as fh:
        for r in range(1, cfg.federation.rounds + 1):
            with Progress(TextColumn(f"round {r}/{cfg.federation.rounds}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                          console=console, transient=True) as bar:
                task_id = bar.add_task("steps", total=cfg.train.local_steps, loss=float("nan"))
                result = train_round(
                    node.model, node.train, spec, unit=cfg.privacy.unit, ledger=ledger,
                    run_id=run_id, round_idx=r,
                    progress=lambda i, n, loss: bar.update(task_id, completed=i, loss=loss),
                    features=node.train_features,
                )
            ev = evaluate(node.model, node.test, cfg.model.task, cfg.train.eval_batch_size,
                          features=node.test_features)
            record = {"round": r, "run_id": run_id, "unit": cfg.privacy.unit, "dataset_id": node.data.dataset_id,
                      **{k: _jsonable(v) for k, v in result.__dict__.items()},
                      "eval": {k: _jsonable(v) for k, v in ev.items()}}
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            rounds.append(record)
            console.print(
                f"round {r}/{cfg.federation.rounds}: train loss {result.mean_loss:.4f}, eval loss {ev['loss']:.4f}, "
                f"{'accuracy' if 'accuracy' in ev else 'perplexity'} {_headline(ev)}, ε spent "
                f"{'∞' if math.isinf(result.epsilon) else f'{result.epsilon:.3f}'} ({result.seconds:.1f}s, "
                f"{result.steps} steps, mean batch {result.mean_batch_size:.1f})"
            )
            table.add_row(str(r), f"{result.mean_loss:.4f}", f"{ev['loss']:.4f}", _headline(ev),
                          "∞" if math.isinf(result.epsilon) else f"{result.epsilon:.3f}", f"{result.seconds:.1f}")
    console.print(table)
    adapter_dir = save_adapter(node.model, out / "adapter",
                               adapter_meta(cfg, node.base.fingerprint, node.data.labels))
    last = rounds[-1]
    summary = {
        "run_id": run_id,
        "model": cfg.model.name,
        "base_fingerprint": node.base.fingerprint,
        "unit": cfg.privacy.unit,
        "dataset_id": node.data.dataset_id,
        "train_records": len(node.train),
        "test_records": len(node.test),
        "before": {k: _jsonable(v) for k, v in before.items()},
        "after": last["eval"],
        "privacy": {
            "enabled": cfg.privacy.enabled,
            "epsilon": last["epsilon"],
            "delta": last["delta"],
            "noise_multiplier": last["noise_multiplier"],
            "sample_rate": last["sample_rate"],
            "noise_source": last["noise_source"],
            "ledger": str(ledger.path),
        },
        "wall_seconds": time.perf_counter() - started,
        "adapter": str(adapter_dir),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    from fedslm.lora.card import write_card

    write_card(out)  # adapter/README.md: the model card, every figure from summary.json
    console.print(f"adapter saved to [bold]{adapter_dir}[/]; metrics in {metrics_path}; summary in {out / 'summary.json'}")
    return summary


def _headline(ev: dict[str, Any]) -> str:
    if "accuracy" in ev:
        return f"{ev['accuracy']:.3f}"
    return f"{ev['perplexity']:.2f}"
