"""The commands that run models: train and simulate a federation, audit a run, and use an adapter
(generate, predict, export) or rebuild a run's report. ``fedslm.cli.main`` registers them on the app."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from fedslm.cli.common import ConfigOpt, DeviceOpt, OverridesArg, console, err_console, load_cfg, user_errors
from fedslm.errors import ConfigError


@user_errors
def train_cmd(
    config: Optional[List[Path]] = ConfigOpt,
    overrides: Optional[List[str]] = OverridesArg,
    device: str = DeviceOpt,
) -> None:
    """Fine-tune on this node's data alone: federation.rounds rounds of DP-LoRA, charged to the ledger."""
    from fedslm.train.runner import run_local

    cfg = load_cfg(config, overrides)
    run_local(cfg, console=console, device=device)


@user_errors
def simulate_cmd(
    config: Optional[List[Path]] = ConfigOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: output.dir)."),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Simulate federation.num_clients institutions on this machine with Flower's simulation engine."""
    from fedslm.simulation.simulate import describe, simulate

    cfg = load_cfg(config, [*(overrides or []), *([f"output.dir={out}"] if out else [])])
    summary = simulate(cfg, console=console)
    describe(summary, Path(cfg.output.dir), console)


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

    cfg = load_cfg(config, overrides)
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
