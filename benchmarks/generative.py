"""The generative path scored: what greedy generation answers to held-out ICD-10-CM descriptions, before and after.

Takes a causal-LM run folder's global adapter (default: the newest `make gemma` folder under runs/),
the first N descriptions of the bundled `icd10-instruct` fixed test split (held out: no node ever
trains on it), and answers each prompt greedily twice, side by side in one run: with the base alone
(the adapter switched off) and with base + adapter. Each answer is read as a coder would
(`fedslm.data.codes`): is its first token a well-formed ICD-10-CM code, is it the exact code, is
the code in the right chapter (by the public chapter ranges). The run's ε per institution is read
from its summary.

    python benchmarks/generative.py [--adapter runs/icd10-gemma-.../adapter] [--records 200] [--out DIR]

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

from fedslm.data.bundled import load_icd10, load_icd10_instruct  # noqa: E402
from fedslm.data.codes import Chapters, read_code, score  # noqa: E402
from fedslm.lora.merge import load_tuned  # noqa: E402
from fedslm.models.generate import generate_batch  # noqa: E402

EXAMPLE = "ICD-10-CM description: Acute bronchitis due to rhinovirus\nCode:"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--records", type=int, default=200, help="held-out descriptions to answer")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="enough for the longest code")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for generative.{json,md}")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = args.adapter or newest_adapter()
    tuned = load_tuned(adapter)
    if tuned.meta["task"] != "causal_lm":
        raise SystemExit(f"{adapter} adapts a {tuned.meta['task']} model; this scores a causal LM")
    test = load_icd10_instruct().test[:args.records]
    prompts = [e.prompt for e in test] + [EXAMPLE]
    truths = [e.completion.split()[0] for e in test]
    chapters = Chapters.from_names(load_icd10().labels)
    tokenizer = tuned.base.tokenizer

    def answers(label: str) -> tuple[list[str], float]:
        started, done = time.perf_counter(), 0

        def step(count: int) -> None:
            nonlocal done
            done += count
            print(f"  {label}: {done}/{len(prompts)} answered", end="\r", flush=True)

        out = generate_batch(tuned.model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, on_batch=step)
        print()
        return out, time.perf_counter() - started

    with tuned.model.disable_adapter():
        before, before_s = answers("base alone")
    after, after_s = answers("base + adapter")
    rows = {}
    for name, completions, seconds in (("before", before, before_s), ("after", after, after_s)):
        s = score(completions[:-1], truths, chapters)
        rows[name] = {**s.as_dict(), "seconds": round(seconds, 1), "example": completions[-1],
                      "first": [{"prompt": p, "truth": t, "answer": c, "code": read_code(c)}
                                for p, t, c in list(zip(prompts, truths, completions))[:5]]}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "adapter": str(adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter),
        "model": tuned.meta["model"], "records": len(truths), "max_new_tokens": args.max_new_tokens,
        "epsilon_per_institution": epsilons(adapter), "before": rows["before"], "after": rows["after"],
    }
    md = render(result)
    print(md)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generative.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "generative.md").write_text(md)
        print(f"wrote {args.out / 'generative.md'}")
    return 0


def render(r: dict) -> str:
    eps = ", ".join(f"{v:.2f}" for v in r["epsilon_per_institution"].values()) or "not in the run's summary"
    lines = [
        f"# The generative path: greedy answers to held-out ICD-10-CM descriptions ({r['date']}, {r['machine']})",
        "",
        f"Adapter `{r['adapter']}` on {r['model']}; the first {r['records']} descriptions of the `icd10-instruct` "
        f"fixed test split, greedy, {r['max_new_tokens']} new tokens; ε per institution: {eps}.",
        "",
        "| | well-formed code | exact code | right chapter | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("before", "base alone (before)"), ("after", "base + adapter (after)")):
        row = r[name]
        lines.append(f"| {label} | {row['well_formed']:.1%} | {row['exact_code']:.1%} | {row['right_chapter']:.1%} "
                     f"| {row['seconds']} |")
    lines += ["", f"\"Acute bronchitis due to rhinovirus\" (J20.6): before `{r['before']['example']!r}`, "
                  f"after `{r['after']['example']!r}`.", "", "First answers after:", ""]
    for row in r["after"]["first"]:
        lines.append(f"- true `{row['truth']}`: `{row['answer']!r}`")
    lines += ["", "Command: `python benchmarks/generative.py`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
