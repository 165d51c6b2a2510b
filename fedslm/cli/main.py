"""The ``fedslm`` command line.

Errors a user can act on (bad config, bad data, a refused budget) print one
line and exit with status 2; nothing else is caught, so real bugs keep their
traceback.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedslm.errors import ConfigError, FedslmError

app = typer.Typer(
    name="fedslm",
    help="Federated, differentially private LoRA fine-tuning of small language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
privacy_app = typer.Typer(help="Plan and inspect differential privacy.", no_args_is_help=True)
ledger_app = typer.Typer(help="Inspect a node's privacy ledger.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")
app.add_typer(ledger_app, name="ledger")
app.add_typer(config_app, name="config")
model_app = typer.Typer(help="Bundled base models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
node_app = typer.Typer(help="An institution's node: write and check its policy, start it.", no_args_is_help=True)
app.add_typer(node_app, name="node")
cache_app = typer.Typer(help="The frozen-prefix feature cache (features of private records: 0600 files).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedslmError as exc:
            # Escaped: the message quotes file names, column names and values, which are not rich markup.
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file(s), merged in order over the defaults.")
DeviceOpt = typer.Option("auto", "--device", help="Where to run: auto (CUDA, else MPS, else the CPU), cpu, cuda, "
                                                  "cuda:N or mps.")
OverridesArg = typer.Argument(None, help="key=value overrides, e.g. privacy.target_epsilon=3 train.lr=1e-3")


def _load(config: Optional[List[Path]], overrides: Optional[List[str]]):
    from fedslm.config import load_config

    return load_config(config or [], overrides or [])


@config_app.command("show")
@user_errors
def config_show(config: Optional[List[Path]] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Print the resolved config (defaults + files + overrides) as YAML."""
    from fedslm.config import to_yaml

    console.print(to_yaml(_load(config, overrides)), markup=False, highlight=False)


def _fmt_eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3f}"


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
        table.add_row(str(r), str(r * local_steps), _fmt_eps(eps))
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
        eps = _fmt_eps(r.epsilon) + ("" if r.private else " (non-private rounds)")
        cells = [r.unit, str(r.num_examples), str(r.rounds), str(r.steps), f"{r.delta:.3g}", eps, r.accountant]
        if distributed:
            cells.insert(6, "—" if r.epsilon_alone is None else _fmt_eps(r.epsilon_alone))
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
    from fedslm.node.policy import template

    if path.exists():
        raise ConfigError(f"{path} already exists; a node policy is never overwritten")
    from fedslm.node.policy import proposed_floor

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
    console.print(f"budget   unit {b['unit']!r}: spent ε={_fmt_eps(b['spent_epsilon'] if b['spent_epsilon'] is not None else math.inf)} of max_epsilon={b['max_epsilon']:g} "
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


def _cache_folder(folder: Optional[Path]) -> Path:
    from fedslm.train.prefix import cache_dir

    return folder.expanduser() if folder is not None else cache_dir()


CacheDirOpt = typer.Option(None, "--dir", help="The cache folder (default: $FEDSLM_CACHE_DIR, else "
                                               "~/.cache/fedslm/features).")


@cache_app.command("show")
@user_errors
def cache_show(folder: Optional[Path] = CacheDirOpt) -> None:
    """List the cache's files (newest first), their sizes and total against the budget."""
    import datetime

    from fedslm.train.prefix import MAX_BYTES_ENV, MAX_FILES, cache_files, max_limit

    where = _cache_folder(folder)
    files = cache_files(where)
    for f, size, mtime in files:
        when = datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
        console.print(f"{f.name[:16]}…  {size / 2**20:9.1f} MiB  {when}")
    total = sum(size for _, size, _ in files)
    console.print(f"{where}: {len(files)} file(s), {total / 2**20:.1f} MiB of {max_limit() / 2**20:.0f} MiB "
                  f"({MAX_BYTES_ENV}) and at most {MAX_FILES} files; the oldest go first")


@cache_app.command("purge")
@user_errors
def cache_purge(folder: Optional[Path] = CacheDirOpt) -> None:
    """Delete every feature-cache file (they are rebuilt from the records on the next round)."""
    from fedslm.train.prefix import prune

    where = _cache_folder(folder)
    gone = prune(where, max_bytes=-1)
    console.print(f"{where}: deleted {len(gone)} file(s), "
                  f"{'nothing left' if not gone else 'the cache is rebuilt from the records when next needed'}")


@app.command("train")
@user_errors
def train_cmd(
    config: Optional[List[Path]] = ConfigOpt,
    overrides: Optional[List[str]] = OverridesArg,
    device: str = DeviceOpt,
) -> None:
    """Fine-tune on this node's data alone: federation.rounds rounds of DP-LoRA, charged to the ledger."""
    from fedslm.train.runner import run_local

    cfg = _load(config, overrides)
    run_local(cfg, console=console, device=device)


@app.command("simulate")
@user_errors
def simulate_cmd(
    config: Optional[List[Path]] = ConfigOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: output.dir)."),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Simulate federation.num_clients institutions on this machine with Flower's simulation engine."""
    from fedslm.simulation.simulate import describe, simulate

    cfg = _load(config, [*(overrides or []), *([f"output.dir={out}"] if out else [])])
    summary = simulate(cfg, console=console)
    describe(summary, Path(cfg.output.dir), console)


@app.command("certs")
@user_errors
def certs_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the credentials (must not hold any yet)."),
    superlink_host: List[str] = typer.Option(..., "--superlink-host", help="Address or host name institutions use "
                                             "to reach the SuperLink; repeat for several (all go in the SAN)."),
    institution: Optional[List[str]] = typer.Option(None, "--institution", "-i", help="Institution name; repeat."),
    days: int = typer.Option(365, "--days", help="Validity of the certificates."),
) -> None:
    """Create a CA, the SuperLink's TLS certificate and one SuperNode key pair per institution."""
    from fedslm.deploy.certs import make_credentials

    creds = make_credentials(out, superlink_host, institution or [], days)
    console.print(f"CA certificate       {creds.ca_cert}  (give to every institution)")
    console.print(f"SuperLink TLS        {creds.superlink_cert}, {creds.superlink_key}  (coordinator only)")
    for name, (priv, pub) in creds.institutions.items():
        console.print(f"institution {name:<9}{priv} (private, stays on its node), {pub}")
    console.print(f"public keys to enrol {creds.enrolled}  (flwr supernode register <name>/auth_key.pub)")


@app.command("audit")
@user_errors
def audit_cmd(
    config: Optional[List[Path]] = ConfigOpt,
    overrides: Optional[List[str]] = OverridesArg,
    canaries: int = typer.Option(200, "--canaries", "-m", help="Canaries, each trained on with probability 1/2."),
    guess_fraction: float = typer.Option(0.2, "--guess-fraction", help="Share of canaries guessed (half in, half out)."),
    confidence: float = typer.Option(0.95, "--confidence"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds canaries and membership (default: random)."),
) -> None:
    """One training run with canaries: an empirical lower bound on ε next to the claimed ε."""
    from fedslm.audit import run_audit, write_audit

    cfg = _load(config, overrides)
    with err_console.status("auditing") as status:
        result = run_audit(cfg, canaries=canaries, guess_fraction=guess_fraction, confidence=confidence, seed=seed,
                           progress=lambda msg: status.update(msg))
    json_path, png_path = write_audit(result, cfg.output.dir)
    table = Table(title="one-run privacy audit (Steinke, Nasr, Jagielski 2023)")
    for col in ("canaries", "guesses", "correct", "claimed ε", f"ε lower bound ({confidence:.0%})", "largest possible"):
        table.add_column(col, justify="right")
    claimed = "∞ (not private)" if result.claimed_epsilon is None else f"{result.claimed_epsilon:.3f}"
    table.add_row(str(result.canaries), str(result.guesses), str(result.correct), claimed,
                  f"{result.epsilon_lower_bound:.3f}", f"{result.max_bound:.3f}")
    console.print(table)
    if result.claimed_epsilon is not None and result.epsilon_lower_bound > result.claimed_epsilon:
        console.print("[bold red]the audit's lower bound exceeds the claimed ε: the training leaks more than it "
                      "claims[/]")
    console.print(f"written: {json_path}, {png_path}")


@model_app.command("prepare")
@user_errors
def model_prepare(name: str = typer.Argument(..., help="A bundled preset, e.g. gemma3-270m or minilm.")) -> None:
    """Make a bundled model ready offline (gemma3-270m: dequantize its GGUF into the cache, once)."""
    from fedslm.models import presets

    preset = presets.get(name)
    if preset is None:
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(presets.names())}")
    with err_console.status(f"preparing {name}"):
        path = preset.locate()
    console.print(f"{name}: {path}")


@model_app.command("list")
def model_list() -> None:
    """The bundled model presets."""
    from fedslm.models import presets

    for name in presets.names():
        p = presets.get(name)
        console.print(f"{name:<13} {', '.join(p.tasks):<15} {p.description}")


@app.command("generate")
@user_errors
def generate_cmd(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="An adapter folder (a run folder's adapter/)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0: greedy; above 0: sampling."),
    top_p: float = typer.Option(0.95, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
    constrained: bool = typer.Option(False, "--constrained", help="Answer only a real ICD-10-CM code, then stop "
                                     "(-n: as long as the longest code)."),
    choices: Optional[Path] = typer.Option(None, "--choices", help="Answer only one line of this file (then stop)."),
    device: str = DeviceOpt,
) -> None:
    """Continue PROMPT with the base model + ADAPTER, printing tokens as they come."""
    from fedslm.lora.merge import load_tuned
    from fedslm.models.generate import AnswerTrie, generate
    from fedslm.predict import closed_set
    from fedslm.train.device import resolve_device

    answers = closed_set(constrained, choices)

    where = resolve_device(device, key="--device")
    with err_console.status("loading base model and adapter"):
        tuned = load_tuned(adapter, where)
    if tuned.meta["task"] != "causal_lm":
        raise ConfigError(f"{adapter} adapts a {tuned.meta['task']} model; generate needs a causal_lm adapter")
    trie = AnswerTrie(tuned.base.tokenizer, answers) if answers is not None else None
    sys.stdout.write(prompt)
    sys.stdout.flush()

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    generate(tuned.model, tuned.base.tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
             top_p=top_p, seed=seed, on_text=show, trie=trie)
    sys.stdout.write("\n")


@app.command("predict")
@user_errors
def predict_cmd(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="An adapter folder (a run folder's adapter/)."),
    input_path: Path = typer.Option(..., "--input", "-i", help="Records to label: a .csv or .jsonl file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write (.csv or .jsonl); default stdout."),
    column: Optional[str] = typer.Option(None, "--column", help="The text column (default: the one the adapter "
                                         "was trained on)."),
    top_k: int = typer.Option(1, "--top-k", "-k", help="Also list the k most probable labels (classification)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Causal LM: tokens per completion."),
    constrained: bool = typer.Option(False, "--constrained", help="Causal LM: answer only real ICD-10-CM codes."),
    choices: Optional[Path] = typer.Option(None, "--choices", help="Causal LM: answer only lines of this file."),
    device: str = DeviceOpt,
) -> None:
    """Label every record of INPUT with the base model + ADAPTER: each record's line, label and probability
    (classification) or its greedy completion (causal LM)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fedslm.predict import closed_set, predict_file

    answers = closed_set(constrained, choices)

    with Progress(TextColumn("labelling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("labelling", total=None)
        report = predict_file(adapter, input_path, out, column=column, top_k=top_k, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, choices=answers, device=device,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))
    for line, reason in report.skipped:
        err_console.print(f"[yellow]skipped[/] {input_path} line {line}: {reason}")
    err_console.print(f"labelled {report.labelled} of {report.records} records in {report.seconds:.1f} s "
                      f"({report.records_per_second:.0f} records/s)" + (f"; wrote {out}" if out else ""))


@app.command("report")
@user_errors
def report_cmd(run_dir: Path = typer.Argument(..., help="A run folder (with metrics.jsonl).")) -> None:
    """Rebuild RUN_DIR's report.html (self-contained, opens offline) and report.png from its files."""
    from fedslm.report_html import write_html

    if not (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} is not a run folder (no metrics.jsonl)")
    page = write_html(run_dir)
    if (run_dir / "summary.json").exists():
        from fedslm.report import write_report

        write_report(run_dir)
    console.print(f"wrote {page}")


@app.command("export")
@user_errors
def export_cmd(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="An adapter folder (a run folder's adapter/)."),
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the merged model (HF format)."),
    device: str = DeviceOpt,
) -> None:
    """Merge ADAPTER into its base and save a folder its stock library loads without fedslm: a Hugging Face
    model (causal LM, [CLS]-pooled classifier) or, for a mean-pooled classifier, a sentence-transformers model
    whose encode() gives the logits; checked against base + B·A and reloaded."""
    from fedslm.lora.adapter import read_adapter_meta
    from fedslm.lora.card import write_export_card
    from fedslm.lora.merge import export_merged
    from fedslm.train.device import resolve_device

    where = resolve_device(device, key="--device")
    meta = read_adapter_meta(adapter)
    if meta.get("task") == "classification" and meta.get("pooling", "cls") == "mean":
        from fedslm.lora.st_export import export_sentence_transformers

        with err_console.status("merging, writing the sentence-transformers folder and reloading it"):
            report = export_sentence_transformers(adapter, out, where)
        write_export_card(adapter, out, "sentence-transformers")  # replaces sentence-transformers' own card
        console.print(f"wrote {out}: {' -> '.join(report['modules'])}, {report['lora_layers']} LoRA layers merged "
                      f"(reloaded logits within {report['max_logit_error']:.2g}); load it with "
                      f"SentenceTransformer({str(out)!r}).encode(texts) for the logits, labels in labels.json")
        return
    with err_console.status("merging and checking"):
        report = export_merged(adapter, out, where)
    write_export_card(adapter, out, "transformers")
    console.print(f"merged {report['lora_layers']} LoRA layers into {out} (max |W' - (W + s·B·A)| = "
                  f"{report['max_merge_error']:.2g}; reloaded logits within {report['max_logit_error']:.2g}); "
                  f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
