"""The one-run privacy audit (Steinke, Nasr and Jagielski, 2023) on MiniLM + LoRA and ICD-10.

Three audits of the same training setup: non-private, DP at ε = 8 and DP at ε = 1. Each inserts m
canaries (random words from ICD-10's vocabulary with a random chapter), each trained on with
probability 1/2, among a subset of ICD-10's training records; trains for several epochs so that a
non-private model can memorise; then guesses membership from per-record loss and reports the
empirical lower bound on ε at 95% confidence next to the claimed ε. A DP run's bound must stay at
or below its claim; the non-private run shows what memorisation looks like to the audit.

    python benchmarks/audit.py            # full (about 15 min on 2 cores)
    python benchmarks/audit.py --quick    # fewer canaries and steps (a few minutes)

Writes benchmarks/results/audit{,_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"
SCENARIO = ROOT / "simulations" / "icd10-hospitals-lora-every-layer.yaml"  # the LoRA scenario these figures were measured on

VARIANTS = [
    ("non-private", ["privacy.enabled=false", "train.lr=0.005"]),
    ("DP ε=8", ["privacy.target_epsilon=8"]),
    ("DP ε=1", ["privacy.target_epsilon=1"]),
]


def main() -> None:
    from fedslm.audit import run_audit, write_audit
    from fedslm.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--records", type=int, help="ICD-10 training records besides the canaries")
    ap.add_argument("--canaries", type=int)
    ap.add_argument("--steps", type=int, help="training steps (of batch 64)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the canaries, DP noise and Poisson sampling")
    args = ap.parse_args()
    quick = args.quick or os.environ.get("QUICK") == "1"
    records = args.records or (300 if quick else 1000)
    canaries = args.canaries or (100 if quick else 500)
    steps = args.steps or (40 if quick else 160)
    setup = (f"MiniLM (mean pooling) + LoRA r=8 on query/value; seed {args.seed}; {records} ICD-10 training records + {canaries} canaries (each in with "
             f"probability 1/2); {steps} steps of batch 64; guesses: the 10% most and 10% least likely members")
    work = Path(tempfile.mkdtemp(prefix="fedslm-audit-"))
    rows: list[dict[str, Any]] = []
    for name, overrides in VARIANTS:
        cfg = load_config([SCENARIO], [
            f"data.max_train_records={records}", "federation.rounds=1", f"train.local_steps={steps}",
            "train.batch_size=64", "train.physical_batch_size=32", f"output.dir={work / name.replace(' ', '_')}",
            f"privacy.noise_seed={args.seed}", *overrides])
        started = time.perf_counter()
        result = run_audit(cfg, canaries=canaries, guess_fraction=0.2, seed=args.seed,
                           progress=lambda msg, n=name: print(f"[{n}] {msg}", flush=True))
        write_audit(result, cfg.output.dir)
        row = {"name": name, "claimed_epsilon": result.claimed_epsilon,
               "epsilon_lower_bound": result.epsilon_lower_bound, "largest_possible": result.max_bound,
               "guesses": result.guesses, "correct": result.correct, "canaries": result.canaries,
               "wall_seconds": time.perf_counter() - started,
               "mean_score_in": sum(result.scores_in) / max(len(result.scores_in), 1),
               "mean_score_out": sum(result.scores_out) / max(len(result.scores_out), 1)}
        rows.append(row)
        claimed = "∞" if row["claimed_epsilon"] is None else f"{row['claimed_epsilon']:.2f}"
        print(f"{name}: {row['correct']}/{row['guesses']} right, ε lower bound {row['epsilon_lower_bound']:.3f} "
              f"(claimed {claimed}, largest possible {row['largest_possible']:.2f}) in {row['wall_seconds']:.0f}s",
              flush=True)
    result_doc = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                  f"Python {platform.python_version()}", "setup": setup, "variants": rows}
    stem = RESULTS / ("audit_quick" if quick else "audit")
    write(result_doc, stem)
    print(f"written: {stem}.json, {stem}.md, {stem}.png")


def write(doc: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    lines = [f"Measured {doc['date']} on {doc['machine']}; {doc['setup']}", "",
             "| run | claimed ε | correct guesses | ε lower bound (95%) | largest possible | verdict | wall |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["variants"]:
        claimed = r["claimed_epsilon"]
        if claimed is None:
            verdict = "memorisation found" if r["epsilon_lower_bound"] > 0 else "nothing found"
        else:
            verdict = "bound ≤ claim" if r["epsilon_lower_bound"] <= claimed else "LEAKS MORE THAN CLAIMED"
        lines.append(f"| {r['name']} | {'∞' if claimed is None else f'{claimed:.2f}'} | {r['correct']}/{r['guesses']} | "
                     f"{r['epsilon_lower_bound']:.3f} | {r['largest_possible']:.2f} | {verdict} | "
                     f"{r['wall_seconds']:.0f} s |")
    lines += ["", "The bound is a lower bound: a DP run may leak less than its claim, and the audit can never "
              "show more than 'largest possible' (all guesses right) with this many canaries and guesses."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = [r["name"] for r in doc["variants"]]
    ax.bar(names, [r["epsilon_lower_bound"] for r in doc["variants"]], color="tab:blue", label="ε lower bound (95%)")
    for i, r in enumerate(doc["variants"]):
        if r["claimed_epsilon"] is not None:
            ax.hlines(r["claimed_epsilon"], i - 0.4, i + 0.4, colors="tab:red",
                      label="claimed ε" if i == 1 else None)
        ax.hlines(r["largest_possible"], i - 0.4, i + 0.4, colors="grey", linestyles="dotted",
                  label="largest possible" if i == 0 else None)
    ax.set(ylabel="ε", title="One-run audit: empirical ε lower bound vs claim")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
