"""``fedslm simulate``: N simulated institutions on one machine, with Flower's simulation engine.

Flower 1.42's current path, driven as a user would: a local ``flower-superlink
--simulation`` (Ray backend) on a free port with its own FLWR_HOME inside the
run folder, and ``flwr run`` submitting this project's ServerApp/ClientApp with
the resolved config. Flower's and Ray's logs go to ``flower.log``; the screen
shows a live table built from the run folder (rounds from ``metrics.jsonl``,
institutions done from their ledgers). Every process started here is stopped
by PID (with its descendants) when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedslm.config import Config, to_yaml
from fedslm.report import FINISHED, read_rounds
from fedslm.simulation.preflight import check_client_gpus, check_data, share_partitions, warm_features
from fedslm.simulation.processes import (  # noqa: F401 - free_port, ray_env: used by callers from here
    CONNECTION, SimulationError, bin_path, app_bundle, free_port, local_superlink, project_dir, ray_env,
    sigterm_unwinds, stop_process_tree, wait_ready, write_flower_config)

def _clients_done(out: Path, round_idx: int) -> int:
    done = 0
    for ledger in (out / "ledgers").glob("*.json"):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            data = json.loads(ledger.read_text(encoding="utf-8"))
            entries = [e for d in data.get("units", {}).values() for e in d.get("entries", [])]
            done += any(e.get("round") == round_idx for e in entries)
    return done


def _table(cfg: Config, rounds: list[dict[str, Any]], out: Path, started: float) -> Table:
    headline = "accuracy" if cfg.model.task == "classification" else "perplexity"
    table = Table(title=f"fedslm simulate: {cfg.federation.num_clients} institutions, {cfg.federation.strategy}, "
                        f"ε target {cfg.privacy.target_epsilon if cfg.privacy.enabled else '∞ (DP off)'}")
    short = "acc" if headline == "accuracy" else "ppl"
    for col in ("round", "trained", "train loss", "eval loss", f"eval {short}", "ε max", "errors", "time"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rounds:
        clients = r["clients"]
        losses = [c["train_loss"] for c in clients if c.get("train_loss") is not None]
        eps = [c["epsilon"] for c in clients if c.get("epsilon") is not None]
        w = r.get("eval_weighted", {})
        table.add_row(str(r["round"]), f"{len([c for c in clients if 'train_loss' in c])}/{cfg.federation.num_clients}",
                      f"{sum(losses) / len(losses):.4f}" if losses else "",
                      f"{w['loss']:.4f}" if "loss" in w else "",
                      f"{w[headline]:.4f}" if headline in w else "",
                      f"{max(eps):.3f}" if eps else "", str(len(r.get("errors", []))),
                      f"{r.get('wall_seconds', 0):.0f}s")
    nxt = len(rounds) + 1
    if nxt <= cfg.federation.rounds:
        table.add_row(str(nxt), f"{_clients_done(out, nxt)}/{cfg.federation.num_clients} trained", "…", "", "", "", "",
                      f"{time.monotonic() - started:.0f}s")
    return table


def _failure_reason(log_file: Path) -> str:
    if not log_file.exists():
        return "no log"
    lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        if "FederationStopped" in line or "Error:" in line or "ERROR" in line:
            return line.strip()[-400:]
    return (lines[-1] if lines else "").strip()[-400:]


def simulate(cfg: Config, console: Optional[Console] = None, app_dir: Optional[Path] = None) -> dict[str, Any]:
    with sigterm_unwinds():
        return _simulate(cfg, console, app_dir)


def _simulate(cfg: Config, console: Optional[Console], app_dir: Optional[Path]) -> dict[str, Any]:
    console = console or Console()
    out = Path(cfg.output.dir).expanduser().resolve()
    cfg.output.dir = str(out)  # absolute: the ServerApp and every ClientApp write into the same folder
    check_client_gpus(cfg)  # before anything is started or written
    whole = check_data(cfg)
    # Imported here: the checkpoint reader pulls in torch and safetensors (seconds), and a bad data file is
    # refused before that.
    from fedslm.coordinator.resume import find_checkpoint

    resume = find_checkpoint(out, cfg)  # refuses a finished run or a different config before anything starts
    out.mkdir(parents=True, exist_ok=True)
    flwr_home = out / ".flwr"
    port = free_port()
    write_flower_config(flwr_home, port, cfg)
    log_file = out / "flower.log"
    # Flower's processes start their own helpers (flower-superexec, flwr-simulation) by name.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
           # The ClientApps are simulated institutions: the scenario stands for their node policies.
           "FEDSLM_SIMULATION": "1", **ray_env(cfg)}
    app = app_bundle(app_dir or project_dir(), flwr_home / "app")
    scores: Optional[dict[str, Any]] = None
    confusions: Optional[dict[str, Any]] = None
    scored = False
    # The SuperLink boots (seconds) while the shared feature pass runs or is read.
    with local_superlink(flwr_home, port, log_file, env) as link:
        warm_features(cfg, whole, console)
        share_partitions(cfg, whole)
        del whole  # this process only waits from here on: the records are the ClientApps' to read
        gc.collect()
        config_path = out / "config.yaml"
        config_path.write_text(to_yaml(cfg), encoding="utf-8")
        started = time.monotonic()
        console.print(f"run folder [bold]{out}[/]; Flower and Ray logs in {log_file}")
        if resume is not None:
            console.print(f"resuming after round {resume.round} of {cfg.federation.rounds} (checkpoint in {out})")
        wait_ready(link, port, log_file)
        cmd = [bin_path("flwr"), "run", str(app), CONNECTION, "--stream",
               "--run-config", f"fedslm-config={json.dumps(str(config_path))}"]
        with log_file.open("ab") as log:
            run = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(app),
                                   start_new_session=True, stdin=subprocess.DEVNULL)
        try:
            with Live(_table(cfg, [], out, started), console=console, refresh_per_second=2, transient=False) as live:
                preparing: Optional[threading.Thread] = None
                prepared: list[Any] = []
                while run.poll() is None:
                    rounds = read_rounds(out)
                    live.update(_table(cfg, rounds, out, started))
                    if preparing is None and rounds:
                        # Scoring needs transformers, PEFT, the base and the held-out records, none of which a
                        # warm run has loaded yet (3-5 s): all but the adapter are made ready while the rounds
                        # run (rounds after the first cost little CPU).
                        preparing = threading.Thread(target=_prepare_scoring, args=(cfg, prepared), daemon=True)
                        preparing.start()
                    if not scored and (out / "summary.json").exists():
                        if preparing is not None:
                            preparing.join()
                        # The ServerApp saved the adapter before its summary: score it while the ServerApp
                        # writes its report.
                        scored = True
                        live.update(_table(cfg, read_rounds(out), out, started))
                        scores, confusions = _scores(cfg, out, prepared[0] if prepared else None)
                        continue
                    if scored and (out / FINISHED).exists():
                        # The run folder is complete: what Flower does from here (the simulation winding Ray
                        # down, 2-5 s) is not waited for.
                        stop_process_tree(link, kill=True)
                        stop_process_tree(run, kill=True)
                        break
                    time.sleep(0.25)
                live.update(_table(cfg, read_rounds(out), out, started))
        finally:
            if run.poll() is None:
                stop_process_tree(run)
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise SimulationError(f"the federation did not finish: {_failure_reason(log_file)} (full log: {log_file})")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if cfg.federation.compare_local:
        from fedslm.simulation.compare import local_baselines
        from fedslm.report import write_report

        with console.status("training each institution alone under the same ε (federation.compare_local)") as st:
            summary["local_only"] = local_baselines(
                cfg, progress=lambda i: st.update(f"institution {i} trained alone"))
        summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        write_report(out)
    summary["wall_seconds_simulation"] = time.monotonic() - started
    if not scored:
        scores, confusions = _scores(cfg, out)
    if scores is not None:
        summary["fixed_test"] = scores
    if confusions is not None:
        summary["per_class"] = confusions
    summary["wall_seconds_total"] = time.monotonic() - started
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    from fedslm.lora.card import write_card

    write_card(out, simulated=True)  # again, now with the fixed test split, per-class scores and local_only
    from fedslm.report_html import write_html

    write_html(out)
    return summary


def _prepare_scoring(cfg: Config, into: list[Any]) -> None:
    """fedslm.simulation.scoring.prepare, in a thread; a failure is left for scoring to meet again."""
    with contextlib.suppress(Exception):
        from fedslm.simulation import scoring

        into.append(scoring.prepare(cfg))


def _scores(cfg: Config, out: Path, prepared: Any = None) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """The global adapter on the fixed test split, and its per-class accuracy at each institution."""
    from fedslm.simulation import scoring

    prepared = prepared if prepared is not None else scoring.prepare(cfg)
    if prepared is None:
        return None, None
    return scoring.score(prepared, out / "adapter")


def describe(summary: dict[str, Any], out: Path, console: Console) -> None:
    final = summary.get("final", {})
    headline = "accuracy" if "accuracy" in final else "perplexity"
    per = summary.get("privacy", {}).get("per_institution", {}).values()
    eps = [e for e in (v.get("epsilon") for v in per) if e is not None]
    alone = [e for e in (v.get("epsilon_alone") for v in per) if e is not None]
    worst = summary.get("worst_institution") or {}
    console.print(
        f"done in {summary.get('wall_seconds_total', summary.get('wall_seconds', 0)):.0f}s: weighted held-out "
        f"{headline} {final.get(headline, float('nan')):.4f}; worst institution {worst.get('institution')} at "
        f"{worst.get(headline, float('nan')):.4f}; ε per institution {', '.join(f'{e:.2f}' for e in eps)}"
        + (f" (of the secure sum; each one's own noise alone: {', '.join(f'{e:.2f}' for e in alone)})" if alone else "")
    )
    local = summary.get("local_only", {}).get(headline)
    if local:
        fed = summary.get("per_institution", {}).get(headline, {})
        console.print("per institution, federated vs alone at the same ε: " + ", ".join(
            f"{k}: {fed.get(k, float('nan')):.3f} vs {v:.3f}" for k, v in sorted(local.items(), key=lambda kv: int(kv[0]))))
    fixed = summary.get("fixed_test")
    if fixed:
        console.print(f"[bold]fixed test split ({fixed['records']} records never trained on): accuracy "
                      f"{fixed['accuracy']:.4f}, macro-F1 {fixed['macro_f1']:.4f}[/] (simulation "
                      f"{summary.get('wall_seconds_simulation', 0):.0f}s)")
    console.print(f"run folder: {out} (config.yaml, metrics.jsonl, summary.json, adapter/, report.html, report.png)")

