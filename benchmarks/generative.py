"""The generative path scored: what greedy generation answers to held-out ICD-10-CM descriptions, before and after.

Takes a causal-LM run folder's global adapter (default: the newest `make gemma` folder under runs/),
the first N descriptions of the bundled `icd10-instruct` fixed test split (held out: no node ever
trains on it), and answers each prompt greedily, side by side in one run: with the base alone
(the adapter switched off) and with base + adapter, each free and constrained to the closed set of
ICD-10-CM codes (a token trie over every code of the public table, `fedslm.models.generate.AnswerTrie`:
the model can write only a real code, then stop). Each answer is read as a coder would
(`fedslm.data.codes`): is its first token a well-formed ICD-10-CM code, is it a valid one (in the
table), is it in the right chapter (by the public chapter ranges), the right category (first 3
characters), the exact code. The run's ε per institution is read from its summary; the issue-28
targets (valid ≥ 95%, right chapter ≥ 80%, at ε = 8) are printed met / not met.

    python benchmarks/generative.py [--adapter runs/icd10-gemma-.../adapter] [--records 200] [--out DIR]
        [--no-constrained]

Writes generative.{json,md} into benchmarks/results/ (or --out DIR; `make gemma` writes them into
its run folder); `--no-save` prints only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT))

from fedslm.data.bundled import icd10_codes, load_icd10, load_icd10_instruct  # noqa: E402
from fedslm.data.codes import Chapters, answer, read_code, score  # noqa: E402
from fedslm.errors import FedslmError  # noqa: E402
from fedslm.lora.merge import load_tuned  # noqa: E402
from fedslm.models.generate import AnswerTrie, generate_batch  # noqa: E402

EXAMPLE = "ICD-10-CM description: Acute bronchitis due to rhinovirus\nCode:"
# Issue 28's targets for the generative path at ε = 8 (rates over the held-out answers).
TARGETS = {"valid_code": 0.95, "right_chapter": 0.80}
MEASURES = (("well_formed", "well-formed code"), ("valid_code", "valid code"), ("right_chapter", "right chapter"),
            ("right_category", "right category"), ("exact_code", "exact code"))
ROWS = (("before", "base alone (before)"), ("after", "base + adapter (after)"),
        ("before_constrained", "base alone, constrained"), ("after_constrained", "base + adapter, constrained"))


def newest_adapter() -> Path:
    runs = sorted((ROOT / "runs").glob("icd10-gemma-*/adapter/fedslm.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no `make gemma` run folder with an adapter under runs/; run `make gemma` or pass --adapter")
    return runs[-1].parent


def epsilons(adapter: Path) -> dict[str, float]:
    summary = adapter.parent / "summary.json"
    if not summary.exists():
        return {}
    per = json.loads(summary.read_text()).get("privacy", {}).get("per_institution", {})
    return {str(k): float(v["epsilon"]) for k, v in per.items() if v.get("epsilon") is not None}


# The recipe keys a reader needs to rerun the adapter's training (from the run folder's config.yaml).
RECIPE_KEYS = {
    "model": ("name", "max_length"),
    "lora": ("r", "alpha", "target_modules", "layers", "ffa"),
    "data": ("source", "max_train_records"),
    "privacy": ("enabled", "target_epsilon", "max_grad_norm", "accountant", "noise_multiplier"),
    "train": ("batch_size", "local_steps", "lr", "optimizer"),
    "federation": ("num_clients", "rounds", "partitioner", "strategy"),
}


def run_facts(adapter: Path) -> dict:
    """The run's recipe (its config.yaml) and training wall time (its summary.json), where the folder has them."""
    import yaml

    out: dict = {}
    config, summary = adapter.parent / "config.yaml", adapter.parent / "summary.json"
    if config.exists():
        cfg = yaml.safe_load(config.read_text()) or {}
        out["recipe"] = {section: {k: (cfg.get(section) or {}).get(k) for k in keys}
                         for section, keys in RECIPE_KEYS.items()}
    if summary.exists():
        wall = json.loads(summary.read_text()).get("wall_seconds")
        out["training_wall_seconds"] = None if wall is None else round(float(wall), 1)
    metrics = adapter.parent / "metrics.jsonl"
    if metrics.exists():  # DP steps each institution took and the noise multiplier its plan calibrated
        steps: dict[str, int] = {}
        sigma: dict[str, float] = {}
        for line in metrics.read_text().splitlines():
            for c in json.loads(line).get("clients", []) if line.strip() else []:
                key = str(c.get("institution"))
                if c.get("steps") is not None:
                    steps[key] = steps.get(key, 0) + int(c["steps"])
                if c.get("noise_multiplier") is not None:
                    sigma[key] = round(float(c["noise_multiplier"]), 4)
        out["dp_steps_per_institution"], out["noise_multiplier_per_institution"] = steps, sigma
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--records", type=int, default=200, help="held-out descriptions to answer")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="enough for the longest code")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-constrained", action="store_true", help="free generation only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for generative.{json,md}")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--note", default=None, help="how the run was made (threads, machine), kept in the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    begun = time.perf_counter()
    adapter = args.adapter or newest_adapter()
    tuned = load_tuned(adapter)
    if tuned.meta["task"] != "causal_lm":
        raise SystemExit(f"{adapter} adapts a {tuned.meta['task']} model; this scores a causal LM")
    test = load_icd10_instruct().test[:args.records]
    prompts = [e.prompt for e in test] + [EXAMPLE]
    truths = [e.completion.split()[0] for e in test]
    chapters = Chapters.from_names(load_icd10().labels)
    codes = icd10_codes()
    tokenizer = tuned.base.tokenizer
    trie = None
    if not args.no_constrained:
        started = time.perf_counter()
        try:
            trie = AnswerTrie(tokenizer, [answer(c) for c in codes])
        except FedslmError as exc:
            raise SystemExit(f"constrained decoding: {exc}") from None
        print(f"code trie: {trie.size} codes, at most {trie.depth} tokens each ({time.perf_counter() - started:.1f} s)")

    def answers(label: str, constrained: bool) -> tuple[list[str], float]:
        started, done = time.perf_counter(), 0

        def step(count: int) -> None:
            nonlocal done
            done += count
            print(f"  {label}: {done}/{len(prompts)} answered", end="\r", flush=True)

        out = generate_batch(tuned.model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, on_batch=step, trie=trie if constrained else None)
        print()
        return out, time.perf_counter() - started

    modes = [False] if trie is None else [False, True]
    runs = {}
    with tuned.model.disable_adapter():
        for constrained in modes:
            runs["before" + ("_constrained" if constrained else "")] = answers(
                "base alone" + (", constrained" if constrained else ""), constrained)
    for constrained in modes:
        runs["after" + ("_constrained" if constrained else "")] = answers(
            "base + adapter" + (", constrained" if constrained else ""), constrained)
    rows = {}
    for name, (completions, seconds) in runs.items():
        s = score(completions[:-1], truths, chapters, codes)
        rows[name] = {**s.as_dict(), "seconds": round(seconds, 1), "example": completions[-1],
                      "first": [{"prompt": p, "truth": t, "answer": c, "code": read_code(c)}
                                for p, t, c in list(zip(prompts, truths, completions))[:5]]}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "adapter": str(adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter),
        "model": tuned.meta["model"], "records": len(truths), "max_new_tokens": args.max_new_tokens,
        "constrained_to": None if trie is None else f"the {trie.size} codes of the bundled ICD-10-CM table",
        "epsilon_per_institution": epsilons(adapter), **run_facts(adapter), "threads": args.threads,
        **({"note": args.note} if args.note else {}),
        "targets": TARGETS, **rows,
    }
    result["benchmark_wall_seconds"] = round(time.perf_counter() - begun, 1)
    md = render(result)
    print(md)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generative.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "generative.md").write_text(md)
        print(f"wrote {args.out / 'generative.md'}")
    return 0


def _rate(value) -> str:
    return "—" if value is None else f"{value:.1%}"


def _recipe_lines(r: dict) -> list[str]:
    lines = []
    recipe = r.get("recipe")
    if recipe:
        lines.append("Recipe: " + "; ".join(
            f"{section}: " + ", ".join(f"{k}={v}" for k, v in keys.items() if v is not None)
            for section, keys in recipe.items()) + ".")
    times = []
    if r.get("training_wall_seconds") is not None:
        times.append(f"training (the federated run) {r['training_wall_seconds']} s")
    if r.get("benchmark_wall_seconds") is not None:
        times.append(f"this scoring {r['benchmark_wall_seconds']} s at {r.get('threads', '?')} thread(s)")
    if times:
        lines.append("Wall time: " + "; ".join(times) + ".")
    if r.get("dp_steps_per_institution"):
        lines.append("DP steps per institution: " + ", ".join(map(str, r["dp_steps_per_institution"].values()))
                     + "; noise multiplier σ: " + ", ".join(map(str, r.get("noise_multiplier_per_institution", {}).values()))
                     + ".")
    if r.get("note"):
        lines.append(f"Note: {r['note']}")
    return lines + ([""] if lines else [])


def render(r: dict) -> str:
    eps = ", ".join(f"{v:.2f}" for v in r["epsilon_per_institution"].values()) or "not in the run's summary"
    constrained = r.get("constrained_to")
    lines = [
        f"# The generative path: greedy answers to held-out ICD-10-CM descriptions ({r['date']}, {r['machine']})",
        "",
        f"Adapter `{r['adapter']}` on {r['model']}; the first {r['records']} descriptions of the `icd10-instruct` "
        f"fixed test split, greedy, {r['max_new_tokens']} new tokens; ε per institution: {eps}. "
        + (f"Constrained: only {constrained}, then an end token." if constrained else "No constrained rows."),
        "",
        *_recipe_lines(r),
        "| | " + " | ".join(label for _, label in MEASURES) + " | seconds |",
        "|---|" + "---|" * (len(MEASURES) + 1),
    ]
    for name, label in ROWS:
        row = r.get(name)
        if row is not None:
            lines.append(f"| {label} | " + " | ".join(_rate(row.get(key)) for key, _ in MEASURES)
                         + f" | {row['seconds']} |")
    epsilons_ = list(r["epsilon_per_institution"].values())
    at = f"ε = {max(epsilons_):.2f}" if epsilons_ else "ε unknown"
    lines += ["", f"Targets (issue 28, generative at ε = 8; this adapter: {at}):"]
    for name in ("after", "after_constrained"):
        row = r.get(name)
        if row is None:
            continue
        for key, goal in r.get("targets", TARGETS).items():
            value = row.get(key)
            if value is None:
                continue
            verdict = "met" if value >= goal else f"not met, short by {100 * (goal - value):.1f} points"
            lines.append(f"- {dict(ROWS)[name]}: {dict(MEASURES)[key]} {value:.1%} (target ≥ {goal:.0%}): {verdict}")
        lines.append(f"- {dict(ROWS)[name]}: exact code {row['exact_code']:.1%} (reported)")
    lines += ["", f"\"Acute bronchitis due to rhinovirus\" (J20.6): before `{r['before']['example']!r}`, "
                  f"after `{r['after']['example']!r}`"
              + (f", after constrained `{r['after_constrained']['example']!r}`." if "after_constrained" in r else "."),
              "", "First answers after:", ""]
    for i, row in enumerate(r["after"]["first"]):
        held = f"; constrained `{r['after_constrained']['first'][i]['answer']!r}`" if "after_constrained" in r else ""
        lines.append(f"- true `{row['truth']}`: `{row['answer']!r}`{held}")
    lines += ["", "Command: `python benchmarks/generative.py`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
