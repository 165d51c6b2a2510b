"""What each lever buys federated DP at ε = 8 on ICD-10 (issue 7): one change at a time from `make run`.

The base is the privacy–utility study's "federated, DP ε=8" (5 institutions, Dirichlet(0.5), MiniLM +
LoRA r=8, 3 rounds × 15 local steps of expected batch 64, lr 0.02). Each lever changes one thing:

* large logical batch at the same compute: expected batch 256 (Poisson), 4 local steps instead of 15,
  so about the same records per round; the physical batch stays 32, so memory stays bounded (the
  per-sample gradients of 256 records are never held at once);
* a tuned learning rate: 0.05 instead of 0.02;
* a longer schedule: 6 rounds instead of 3 (twice the compute; σ is recalibrated so ε stays 8);
* fewer trainable dimensions: LoRA rank 2 instead of 8 (less noise in total, less capacity).

Every variant is scored on the fixed ICD-10 test split, like the study.

    python benchmarks/levers.py            # about 25 min on 2 cores
    python benchmarks/levers.py --quick    # 2 rounds × 5 steps, base and the batch lever only

Writes benchmarks/results/levers{,_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from privacy_utility import RESULTS, run_variant

BASE = ["privacy.target_epsilon=8"]
LEVERS = [
    ("base (make run)", []),
    ("batch 256, 4 steps (same records)", ["train.batch_size=256", "train.physical_batch_size=32",
                                           "train.local_steps=4"]),
    ("lr 0.05", ["train.lr=0.05"]),
    ("6 rounds", ["federation.rounds=6"]),
    ("LoRA r=2", ["lora.r=2", "lora.alpha=4"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    quick = args.quick or os.environ.get("QUICK") == "1"
    common = ["federation.rounds=2", "train.local_steps=5"] if quick else ["federation.rounds=3",
                                                                          "train.local_steps=15"]
    levers = LEVERS[:2] if quick else LEVERS
    work = Path(tempfile.mkdtemp(prefix="fedslm-levers-"))
    rows = []
    for name, overrides in levers:
        if quick and name.startswith("batch"):
            overrides = ["train.batch_size=256", "train.physical_batch_size=32", "train.local_steps=1"]
        rows.append(run_variant(name, "fed", BASE + overrides, common, work, 5, 64))
    base = rows[0]["fixed_test"]["accuracy"]
    doc = {"date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "setup": "federated DP ε=8, 5 institutions, Dirichlet(0.5), MiniLM + LoRA; " + " ".join(common),
           "variants": rows}
    stem = RESULTS / ("levers_quick" if quick else "levers")
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    lines = [f"Measured {doc['date']} on {doc['machine']}; {doc['setup']}", "",
             "| lever | fixed-test accuracy | macro-F1 | vs base | worst institution | wall |", "|---|---|---|---|---|---|"]
    for r in rows:
        acc = r["fixed_test"]["accuracy"]
        worst = r.get("worst_institution") or {}
        lines.append(f"| {r['name']} | {acc:.4f} | {r['fixed_test']['macro_f1']:.4f} | {100 * (acc - base):+.1f} pts | "
                     f"{worst.get('accuracy', float('nan')):.3f} | {r['wall_seconds']:.0f} s |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(doc, stem.with_suffix(".png"))
    print("\n".join(lines))
    print(f"written: {stem}.json, {stem}.md, {stem}.png")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["variants"]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    acc = [100 * r["fixed_test"]["accuracy"] for r in rows]
    ax.barh([r["name"] for r in rows][::-1], acc[::-1], color="tab:blue")
    ax.axvline(acc[0], color="grey", linestyle=":", label="base")
    for y, value in enumerate(acc[::-1]):
        ax.text(value + 0.5, y, f"{value:.1f}%", va="center", fontsize=8)
    ax.set(xlabel="fixed-test accuracy (%)", title="Federated DP ε=8: one lever at a time", xlim=(0, 100))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
