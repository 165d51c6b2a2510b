"""What each lever buys federated DP at ε = 8 on ICD-10 (issue 7): one change at a time from `make run`.

The base is the privacy–utility study's "federated, DP ε=8" (5 institutions, Dirichlet(0.5), MiniLM with
mean pooling + LoRA r=8 on query/value, 3 rounds × 15 local steps of expected batch 64, lr 0.02). Each
lever changes one thing:

* the head's input: MiniLM's [CLS] pooler (with LoRA on it) instead of the mean of the token vectors,
  i.e. what the previous default bought or cost;
* large logical batch at the same compute: expected batch 256 (Poisson), 4 local steps instead of 15,
  so about the same records per round; the physical batch stays 32, so memory stays bounded (the
  per-sample gradients of 256 records are never held at once);
* a tuned learning rate: 0.01 instead of 0.02 (centralized DP diverges at 0.02; see the study);
* client drift at the same compute: 9 rounds × 5 local steps instead of 3 × 15;
* a longer schedule: 6 rounds instead of 3 (twice the compute; σ is recalibrated so ε stays 8);
* fewer bytes, towards the 0.1%-of-the-model target of benchmarks/federation_overhead.py: LoRA rank 4
  sent in float16 (0.100%: the 22-way head's 8,470 parameters keep it a hair over), and FFA-LoRA at
  rank 4 in float16 (only B is sent: 0.059%); what does each cost?

Every variant uses the same noise seed and is scored on the fixed ICD-10 test split, like the study.

    python benchmarks/levers.py            # about 40 min on 2 cores
    python benchmarks/levers.py --quick    # 1 round × 3 steps on 2,000 records: base and the pooling lever
    python benchmarks/levers.py --only "lr 0.01"    # rerun one lever, merged into the existing results

Writes benchmarks/results/levers{,_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from privacy_utility import QUICK_COMMON, QUICK_TEST, RESULTS, run_variant

BASE = ["privacy.target_epsilon=8"]
LEVERS = [
    ("base (make run)", []),
    ("[CLS] pooler instead of mean", ["model.pooling=cls", "lora.target_modules=[query,value,pooler.dense]"]),
    ("batch 256, 4 steps (same records)", ["train.batch_size=256", "train.physical_batch_size=32",
                                           "train.local_steps=4"]),
    ("lr 0.01", ["train.lr=0.01"]),
    ("9 rounds × 5 steps (same compute)", ["federation.rounds=9", "train.local_steps=5"]),
    ("6 rounds", ["federation.rounds=6"]),
    ("LoRA r=4, float16 transfer", ["lora.r=4", "lora.alpha=8", "federation.transfer_dtype=float16"]),
    ("FFA-LoRA r=4, float16 transfer", ["lora.ffa=true", "lora.r=4", "lora.alpha=8",
                                        "federation.transfer_dtype=float16"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="privacy.noise_seed for every variant")
    ap.add_argument("--only", nargs="+", metavar="LEVER",
                    help="run just these levers (by name) and merge them into the existing results")
    args = ap.parse_args()
    quick = args.quick or os.environ.get("QUICK") == "1"
    common = (QUICK_COMMON if quick else ["federation.rounds=3", "train.local_steps=15"]) + [
        f"privacy.noise_seed={args.seed}"]
    levers = LEVERS[:2] if quick else LEVERS
    stem = RESULTS / ("levers_quick" if quick else "levers")
    kept: dict[str, dict] = {}
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _ in levers})
        if unknown:
            ap.error(f"--only: no lever named {', '.join(unknown)}; the levers are: "
                     + "; ".join(name for name, _ in levers))
        if stem.with_suffix(".json").is_file():
            kept = {r["name"]: r for r in json.loads(stem.with_suffix(".json").read_text())["variants"]}
        levers = [lv for lv in levers if lv[0] in args.only]
    work = Path(tempfile.mkdtemp(prefix="fedslm-levers-"))
    kept.update({name: run_variant(name, "fed", BASE + overrides, common, work, 5, 64,
                                   test_cap=QUICK_TEST if quick else None) for name, overrides in levers})
    rows = [kept[name] for name, _ in LEVERS if name in kept]
    if not rows or rows[0]["name"] != LEVERS[0][0]:
        ap.error(f"no '{LEVERS[0][0]}' result to compare with; run without --only first")
    base = rows[0]["fixed_test"]["accuracy"]
    doc = {"date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "seed": args.seed, "quick": quick,
           "setup": "federated DP ε=8, 5 institutions, Dirichlet(0.5), MiniLM + LoRA; " + " ".join(common),
           "variants": rows}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    lines = [f"Measured {doc['date']} on {doc['machine']}; {doc['setup']}", "",
             "| lever | fixed-test accuracy | macro-F1 | vs base | worst institution | bytes up / model | wall |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r["fixed_test"]["accuracy"]
        worst = r.get("worst_institution") or {}
        lines.append(f"| {r['name']} | {acc:.4f} | {r['fixed_test']['macro_f1']:.4f} | {100 * (acc - base):+.1f} pts | "
                     f"{worst.get('accuracy', float('nan')):.3f} | {100 * r['bytes_up_share']:.3f}% | "
                     f"{r['wall_seconds']:.0f} s |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(doc, stem.with_suffix(".png"))
    print("\n".join(lines))
    print(f"written: {stem}.json, {stem}.md, {stem}.png")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["variants"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    acc = [100 * r["fixed_test"]["accuracy"] for r in rows]
    ax.barh([r["name"] for r in rows][::-1], acc[::-1], color="tab:blue")
    ax.axvline(acc[0], color="grey", linestyle=":", label="base")
    study = RESULTS / "privacy_utility.json"
    if study.is_file() and not doc.get("quick"):  # the target: within 2 points of centralized non-private (same budget)
        ref = next((r for r in json.loads(study.read_text())["variants"] if r["name"] == "centralized, non-private"),
                   None)
        if ref is not None:
            ax.axvline(100 * ref["fixed_test"]["accuracy"] - 2, color="tab:red", linestyle="--",
                       label="target: centralized non-private − 2 pts")
    for y, value in enumerate(acc[::-1]):
        ax.text(value + 0.5, y, f"{value:.1f}%", va="center", fontsize=8)
    ax.set(xlabel="fixed-test accuracy (%)", title="Federated DP ε=8: one lever at a time", xlim=(0, 100))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
