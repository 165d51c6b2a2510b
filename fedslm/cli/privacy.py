"""``fedslm privacy`` and ``fedslm ledger``: plan differential privacy, read and migrate a node's ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from fedslm.cli.common import console, fmt_eps, user_errors
from fedslm.errors import ConfigError

privacy_app = typer.Typer(help="Plan and inspect differential privacy.", no_args_is_help=True)
ledger_app = typer.Typer(help="Inspect a node's privacy ledger.", no_args_is_help=True)


@privacy_app.command("plan")
@user_errors
def privacy_plan_cmd(
    examples: int = typer.Option(..., "--examples", "-n", help="Training records on the node."),
    batch_size: int = typer.Option(..., "--batch-size", "-b", help="Expected (Poisson) batch size."),
    local_steps: int = typer.Option(..., "--local-steps", "-s", help="DP-SGD steps per round."),
    rounds: int = typer.Option(..., "--rounds", "-r", help="Federated rounds."),
    epsilon: float = typer.Option(..., "--epsilon", "-e", help="Target ε after all rounds."),
    delta: Optional[float] = typer.Option(None, "--delta", "-d", help="δ (default 1/(10 n))."),
    accountant: str = typer.Option("rdp", "--accountant", help="rdp or prv."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
) -> None:
    """σ calibrated so the whole plan reaches ε at δ, and ε after each round."""
    from fedslm.errors import ConfigError
    from fedslm.privacy import plan

    for name, value in (("--examples", examples), ("--batch-size", batch_size), ("--local-steps", local_steps),
                        ("--rounds", rounds)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"--epsilon must be > 0 and finite, got {epsilon}")
    if delta is not None and not 0.0 < delta < 1.0:  # also refuses nan
        raise ConfigError(f"--delta must be in (0, 1), got {delta}")
    if accountant not in ("rdp", "prv"):
        raise ConfigError(f"--accountant must be one of rdp, prv; got {accountant!r}")
    pl = plan(num_examples=examples, batch_size=batch_size, local_steps=local_steps, rounds=rounds,
              target_epsilon=epsilon, delta=delta, accountant=accountant)
    if as_json:
        print(json.dumps({
            "noise_multiplier": pl.noise_multiplier, "sample_rate": pl.sample_rate, "delta": pl.delta,
            "target_epsilon": pl.target_epsilon, "accountant": pl.accountant, "local_steps": pl.local_steps,
            "rounds": pl.rounds, "total_steps": pl.total_steps, "epsilon_per_round": list(pl.epsilon_per_round),
        }, indent=2))
        return
    console.print(
        f"noise multiplier σ = [bold]{pl.noise_multiplier:.4f}[/]   sample rate q = {pl.sample_rate:.5g} "
        f"({batch_size}/{examples})   δ = {pl.delta:.3g}   accountant = {accountant}"
    )
    table = Table(title=f"ε after each round ({local_steps} steps per round)")
    table.add_column("round", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("ε", justify="right")
    for r, eps in enumerate(pl.epsilon_per_round, start=1):
        table.add_row(str(r), str(r * local_steps), fmt_eps(eps))
    console.print(table)


@ledger_app.command("show")
@user_errors
def ledger_show(
    path: Path = typer.Argument(..., help="The node's ledger file (privacy.ledger)."),
    accountant: Optional[str] = typer.Option(None, "--accountant", help="rdp or prv; default: the one each unit's "
                                             "latest round was charged with."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """What this node has spent, per privacy unit, composed over every round and run."""
    from fedslm.errors import ConfigError
    from fedslm.privacy import Ledger

    if not path.is_file():
        raise ConfigError(f"ledger {path} does not exist (nothing spent yet, or a wrong path)")
    if accountant not in (None, "rdp", "prv"):
        raise ConfigError(f"--accountant must be one of rdp, prv; got {accountant!r}")
    rows = Ledger(path).summary(accountant)
    if as_json:
        print(json.dumps([{**r.__dict__, "epsilon": None if math.isinf(r.epsilon) else r.epsilon} for r in rows],
                         indent=2))
        return
    table = Table(title=f"privacy spent — {path}")
    distributed = any(r.epsilon_alone is not None for r in rows)
    cols = ["privacy unit", "records", "rounds", "steps", "δ", "ε spent", "accountant"]
    if distributed:  # distributed-noise rounds: ε of the secure sum as assumed, and of this node's noise alone
        cols[5] = "ε spent (sums as assumed)"
        cols.insert(6, "ε of own noise alone")
    for col in cols:
        table.add_column(col, justify="left" if col == "privacy unit" else "right")
    for r in rows:
        eps = fmt_eps(r.epsilon) + ("" if r.private else " (non-private rounds)")
        cells = [r.unit, str(r.num_examples), str(r.rounds), str(r.steps), f"{r.delta:.3g}", eps, r.accountant]
        if distributed:
            cells.insert(6, "—" if r.epsilon_alone is None else fmt_eps(r.epsilon_alone))
        table.add_row(*cells)
    console.print(table)


@ledger_app.command("migrate")
@user_errors
def ledger_migrate(
    path: Path = typer.Argument(..., help="A ledger written by an earlier fedslm (one budget per content hash)."),
    unit: str = typer.Option(..., "--unit", "-u", help="The privacy unit its spend is charged to (your policy's "
                             "privacy.unit; all-records by default)."),
) -> None:
    """Charge every round of an old ledger to one privacy unit, so none of its spend is forgotten."""
    from fedslm.privacy import Ledger

    if not path.is_file():
        raise ConfigError(f"ledger {path} does not exist")
    moved = Ledger(path).migrate(unit)
    console.print(f"{path}: {moved} round(s) now charged to privacy unit {unit!r}")
