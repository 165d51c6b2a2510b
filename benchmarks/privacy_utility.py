"""Privacy–utility on ICD-10 (22 chapters): centralized vs federated, non-private vs DP, LoRA vs FFA-LoRA.

Every variant trains MiniLM + LoRA with the LoRA scenario (simulations/icd10-hospitals-lora-every-layer.yaml:
5 institutions, Dirichlet(0.5) over chapters) and is scored on the same fixed test set (the bundled
ICD-10 test split, 4,867 records, never trained on): accuracy and macro-F1. Federated variants also
report each institution's held-out accuracy (its own 10%) and the worst institution; the ε = 8 run
also trains each institution alone under the same ε (`federation.compare_local`).

Centralized variants see the same records per step as the whole federation (batch = institutions ×
batch) for rounds × local steps steps, so compute is matched.

    python benchmarks/privacy_utility.py            # full: all variants (about 40 min on 2 cores)
    python benchmarks/privacy_utility.py --quick    # 3 variants, 1 round × 3 steps on 2,000 records

Writes benchmarks/results/privacy_utility{,_quick}.{json,md,png}. Targets (issue 7): federated DP at
ε = 8 within 2 points of centralized non-private accuracy; at ε = 1 within 6.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "simulations" / "icd10-hospitals-lora-every-layer.yaml"  # the LoRA scenario these figures were measured on
DP_LR = yaml.safe_load(SCENARIO.read_text(encoding="utf-8"))["train"]["lr"]

# Without clipping, AdamW at the DP learning rate collapses to the majority class; non-private
# variants use a learning rate of their own.
NON_PRIVATE = ["privacy.enabled=false", "train.lr=0.002"]
# name, kind, overrides
FULL = [
    ("centralized, non-private", "central", NON_PRIVATE),
    ("centralized, DP ε=8", "central", ["privacy.target_epsilon=8"]),
    ("federated, non-private", "fed", NON_PRIVATE),
    ("federated, DP ε=8", "fed", ["privacy.target_epsilon=8", "federation.compare_local=true"]),
    ("federated, DP ε=3", "fed", ["privacy.target_epsilon=3"]),
    ("federated, DP ε=1", "fed", ["privacy.target_epsilon=1"]),
    ("federated FFA-LoRA, DP ε=8", "fed", ["privacy.target_epsilon=8", "lora.ffa=true"]),
]
QUICK = [FULL[0], FULL[1], ("federated, DP ε=8", "fed", ["privacy.target_epsilon=8"])]
# The quick run is a smoke test of the whole pipeline, not a measurement: one short round on few records,
# scored on the first QUICK_TEST records of the fixed test set.
QUICK_COMMON = ["federation.rounds=1", "train.local_steps=3", "data.max_train_records=2000"]
QUICK_TEST = 1000


def _run(cmd: list[str], log: Path) -> None:
    with log.open("ab") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)


def _fixed_test_scores(adapter: Path, cap: int | None = None) -> dict[str, float]:
    from fedslm.config.schema import DataConfig
    from fedslm.data import load_task_data
    from fedslm.data.tasks import get_task
    from fedslm.lora.merge import load_tuned
    from fedslm.train.evaluate import evaluate

    tuned = load_tuned(adapter)
    data = load_task_data(DataConfig(source="icd10"), "classification")
    enc = get_task("classification").encode(data.test[:cap], tuned.base.tokenizer, int(tuned.meta["max_length"]))
    ev = evaluate(tuned.model, enc, "classification", 256)
    return {"accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"], "test_records": len(enc)}


def run_variant(name: str, kind: str, overrides: list[str], common: list[str], work: Path, clients: int,
                batch: int, test_cap: int | None = None) -> dict[str, Any]:
    out = work / name.replace(" ", "_").replace(",", "").replace("=", "").replace("ε", "eps")
    log = work / "bench.log"
    started = time.perf_counter()
    if kind == "central":
        _run([sys.executable, "-m", "fedslm.cli.main", "train", "-c", str(SCENARIO), *common, *overrides,
              f"train.batch_size={batch * clients}", f"train.physical_batch_size={batch}",
              "data.max_test_records=null", f"output.dir={out}"], log)
        summary = json.loads((out / "summary.json").read_text())
        row: dict[str, Any] = {"epsilon": summary.get("privacy", {}).get("epsilon")}
    else:
        _run([sys.executable, "-m", "fedslm.cli.main", "simulate", "-c", str(SCENARIO), "--out", str(out), *common,
              *overrides], log)
        summary = json.loads((out / "summary.json").read_text())
        per = summary["per_institution"]["accuracy"]
        eps = [v["epsilon"] for v in summary["privacy"]["per_institution"].values()]
        sent = summary["bytes"]["up_total"] / max(1, len(per) * summary["rounds_completed"])
        row = {"per_institution": per, "worst_institution": summary["worst_institution"],
               "bytes_up_per_institution_round": sent, "bytes_up_share": sent / summary["bytes"]["base_model"],
               "epsilon": max(e for e in eps if e is not None) if any(e is not None for e in eps) else None}
        if "local_only" in summary:
            row["local_only"] = summary["local_only"]["accuracy"]
    row.update({"name": name, "kind": kind, "wall_seconds": time.perf_counter() - started,
                "fixed_test": _fixed_test_scores(out / "adapter", test_cap)})
    print(f"{name}: fixed-test accuracy {row['fixed_test']['accuracy']:.4f}, macro-F1 "
          f"{row['fixed_test']['macro_f1']:.4f} ({row['wall_seconds']:.0f}s)", flush=True)
    return row


def write(result: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    rows = result["variants"]
    ref = next(r for r in rows if r["name"] == "centralized, non-private")["fixed_test"]["accuracy"]
    lines = [f"Measured {result['date']} on {result['machine']}; {result['setup']}", "",
             "| variant | ε (per institution) | fixed-test accuracy | macro-F1 | vs centralized non-private | "
             "worst institution (own held-out) | wall |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        worst = r.get("worst_institution")
        worst_s = f"{worst['accuracy']:.3f} (#{worst['institution']})" if worst else "—"
        acc = r["fixed_test"]["accuracy"]
        lines.append(f"| {r['name']} | {eps} | {acc:.4f} | {r['fixed_test']['macro_f1']:.4f} | "
                     f"{100 * (acc - ref):+.1f} pts | {worst_s} | {r['wall_seconds']:.0f} s |")
    local = next((r for r in rows if "local_only" in r), None)
    if local:
        lines += ["", f"Per institution, {local['name']} vs the same institution trained alone under the same ε "
                  "(own held-out accuracy):", "", "| institution | federated | alone |", "|---|---|---|"]
        for k in sorted(local["per_institution"], key=int):
            lines.append(f"| {k} | {local['per_institution'][k]:.3f} | {local['local_only'].get(k, float('nan')):.3f} |")
    lines += ["", "Targets (issue 7): federated DP ε=8 within 2 points of centralized non-private; ε=1 within 6."]
    if result["quick"]:
        lines.append("- Quick run: a smoke test of the pipeline (one short round on 2,000 records), not a "
                     "measurement; targets are judged on the full run only.")
    for target_name, gap in (() if result["quick"] else (("federated, DP ε=8", 2.0), ("federated, DP ε=1", 6.0))):
        r = next((x for x in rows if x["name"] == target_name), None)
        if r is not None:
            d = 100 * (ref - r["fixed_test"]["accuracy"])
            lines.append(f"- {target_name}: {d:.1f} points below (target ≤ {gap:g}): {'met' if d <= gap else 'not met'}")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(11, 4.8))
    names = [r["name"] for r in rows]
    ax.bar(range(len(rows)), [r["fixed_test"]["accuracy"] for r in rows], label="fixed-test accuracy")
    ax.scatter(range(len(rows)), [r["fixed_test"]["macro_f1"] for r in rows], color="black", zorder=3,
               label="macro-F1")
    worst = [(i, r["worst_institution"]["accuracy"]) for i, r in enumerate(rows) if r.get("worst_institution")]
    if worst:
        ax.scatter([i for i, _ in worst], [w for _, w in worst], marker="v", color="tab:red", zorder=3,
                   label="worst institution (own held-out)")
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="accuracy", title=f"ICD-10 chapter (22 classes), MiniLM + LoRA: privacy vs utility "
                                    f"({'quick' if result['quick'] else 'full'})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 variants, one short round on 2,000 records")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--local-steps", type=int)
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds DP noise and Poisson sampling (privacy.noise_seed), so a rerun reproduces the table")
    args = ap.parse_args()
    quick = args.quick or os.environ.get("QUICK") == "1"
    rounds = args.rounds or (1 if quick else 3)
    steps = args.local_steps or (3 if quick else 15)
    clients, batch = 5, 64
    common = [*(QUICK_COMMON if quick else []), f"privacy.noise_seed={args.seed}"]
    if not quick or args.rounds or args.local_steps:  # later overrides win
        common += [f"federation.rounds={rounds}", f"train.local_steps={steps}"]
    work = Path(tempfile.mkdtemp(prefix="fedslm-privacy-utility-"))
    print(f"runs and logs in {work}", flush=True)
    variants = QUICK if quick else FULL
    rows = [run_variant(n, k, o, common, work, clients, batch, test_cap=QUICK_TEST if quick else None)
            for n, k, o in variants]
    result = {
        "benchmark": "privacy_utility", "quick": quick, "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "seed": args.seed,
        "setup": (f"MiniLM (mean pooling) + LoRA r=8 (query, value); {clients} institutions, Dirichlet(0.5); {rounds} rounds × "
                  f"{steps} local steps of batch {batch} (centralized: {rounds * steps} steps of batch "
                  f"{batch * clients}); lr {DP_LR} with DP, 0.002 without; noise seed {args.seed}"
                  + (f"; training records capped at 2,000; fixed test set = the first {QUICK_TEST:,} records of "
                     "the bundled ICD-10 test split" if quick else
                     "; fixed test set = the bundled ICD-10 test split (4,867 records)")),
        "variants": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / ("privacy_utility_quick" if quick else "privacy_utility")
    write(result, stem)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
