"""``fedslm node``: an institution writes and checks its policy, makes its SecAgg+ identity, starts its node."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from fedslm.cli.common import console, err_console, fmt_eps, user_errors
from fedslm.errors import ConfigError, FedslmError

node_app = typer.Typer(help="An institution's node: write and check its policy, start it.", no_args_is_help=True)


@node_app.command("init")
@user_errors
def node_init(
    path: Path = typer.Argument(..., help="Where to write the policy (must not exist)."),
    name: str = typer.Option("my-hospital", "--name", help="The institution's name in its own logs."),
    data: str = typer.Option("/data/records.csv", "--data", help="The institution's records (.csv or .jsonl)."),
    ledger: Optional[str] = typer.Option(None, "--ledger", help="The ledger file (default: beside the policy)."),
) -> None:
    """Write a commented node policy template to PATH."""
    from fedslm.config.schema import DataConfig
    from fedslm.data import load_task_data
    from fedslm.node.policy_template import proposed_floor, template

    if path.exists():
        raise ConfigError(f"{path} already exists; a node policy is never overwritten")

    labels, floor = None, None
    try:  # the label set of the records, if they are a classification file already
        records = load_task_data(DataConfig(source=data), "classification")
        labels, floor = records.labels, proposed_floor(len(records.train))
    except FedslmError as exc:
        err_console.print(f"note: no label set read from {escape(data)} ({escape(str(exc))}); set data.labels in the "
                          "policy for classification")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template(path, name=name, source=data, ledger=ledger, labels=labels, size_floor=floor),
                    encoding="utf-8")
    console.print(f"wrote {path}; edit it, then: fedslm node check {path}")


@node_app.command("keygen")
@user_errors
def node_keygen(
    path: Path = typer.Argument(..., help="Where to write this institution's private identity key (must not exist)."),
) -> None:
    """Make this institution's SecAgg+ identity: PATH (private, 0600, stays on the node) and PATH.pub (send it to
    the other institutions out of band; each lists it under secure_aggregation.peers)."""
    from fedslm.wire import identity

    private, public = identity.generate(path)
    console.print(f"wrote {private} (private: keep it on this node) and {public} (public)")
    console.print(f"fingerprint {identity.fingerprint(identity.load_public(public))}: read it to the other "
                  "institutions over a second channel, so they know the .pub they got is yours")
    console.print(f"then in this node's policy: secure_aggregation.identity_key: {private}")


@node_app.command("start", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def node_start(ctx: typer.Context) -> None:
    """Start this institution's node: flower-supernode (its arguments, as given) in process isolation,
    with this installation's ClientApp serving every task; the coordinator's bundle is never run.

    Example: fedslm node start --superlink coord.example:9092 --root-certificates ca.pem
    --auth-supernode-private-key node.key --node-config 'policy="/etc/fedslm/policy.yaml"'
    """
    import logging

    from fedslm.node.runtime import start_node

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code = start_node(ctx.args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    raise typer.Exit(code)


@node_app.command("check")
@user_errors
def node_check(
    path: Path = typer.Argument(..., help="The node policy."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Validate a node policy, read its data, and show its split, budget and allowed models."""
    from fedslm.node.check import check_policy

    report = check_policy(path)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"[bold]{escape(str(path))}[/]: valid node policy for [bold]{escape(report['name'])}[/]")
    console.print(f"data     {escape(report['data']['source'])}: {report['data']['train_records']} training / "
                  f"{report['data']['test_records']} held-out records (split seed {report['data']['split_seed']}, "
                  f"{len(report['data']['labels'] or [])} labels)")
    b = report["privacy"]
    console.print(f"budget   unit {b['unit']!r}: spent ε={fmt_eps(b['spent_epsilon'] if b['spent_epsilon'] is not None else math.inf)} of max_epsilon={b['max_epsilon']:g} "
                  f"at δ={b['max_delta']:g} (1/n = {b['one_over_n']:.3g}); ledger {b['ledger']}")
    console.print(f"rounds   non-private {'allowed' if b['allow_non_private'] else 'refused'}; secure noise "
                  f"{'required' if b['require_secure_noise'] else 'optional'}; secure aggregation "
                  f"{'required' if b['require_secure_aggregation'] else 'optional'}")
    e = report["evaluation"]
    console.print(f"evaluate unit {e['unit']!r}: spent ε={e['spent_epsilon']:.3f} of {e['max_epsilon']:g}, "
                  f"{e['epsilon_per_evaluation']:g} each; releases {', '.join(e['release'])} with noise std "
                  f"{e['noise_std_per_sum']:.1f} per sum (accuracy ±{e['accuracy_noise_points']:.1f} points at this "
                  "held-out size)")
    console.print(f"models   {', '.join(report['models']['allowed'])}")
    r = report["resources"]
    console.print(f"memory   training chunks <= {r['max_physical_batch_size']} records, evaluation batches <= "
                  f"{r['max_eval_batch_size']}, max_length <= {r['max_length']} tokens")
    console.print(f"device   resources.device {r['device']} -> {r['resolved_device']} (torch sees {r['torch_sees']})")
    s = report["secure_aggregation"]
    console.print(f"secagg   cohort >= {s['min_cohort']}, threshold >= {s['min_threshold']}; identity "
                  f"{s['identity'] or 'none'}; peers {', '.join(f'{k} ({v})' for k, v in s['peers'].items()) or 'none'}")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
