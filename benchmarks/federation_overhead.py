"""Framework overhead per round and bytes per round, from a real `fedslm simulate` run.

Runs a small federation of MiniLM + LoRA on ICD-10 through Flower's simulation
engine with as many institutions as Ray has CPU slots (so institutions run side
by side and no one waits for a slot), then reads the run folder:

* overhead per round = round wall time (server side) minus the slowest
  institution's compute (its train handler + its evaluate handler, each timed
  inside the ClientApp, model loading included). What remains is Flower, Ray,
  messaging, aggregation and checkpointing.
* bytes up per institution per round / bytes of the full model (fp32), for the adapter sent in
  float32 (the main run), in float16 (`federation.transfer_dtype=float16`), in float16 with FFA-LoRA at
  rank 4 (only B is sent), and masked under secure aggregation (`federation.secure_aggregation=true`, 3 institutions), each
  from a one-round run.

    python benchmarks/federation_overhead.py [--rounds 4] [--clients 2]   # writes results/federation_overhead.{json,md,png}

Targets (issue 3): overhead <= 10% of a round; bytes <= 0.1% of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "federation_overhead.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedslm-bench-"))

    def simulate(name: str, clients: int, rounds: int, *extra: str) -> Path:
        run_dir = work / name
        cmd = [sys.executable, "-m", "fedslm.cli.main", "simulate", "-c",
               str(ROOT / "simulations/icd10-hospitals-lora-every-layer.yaml"), "--out", str(run_dir),
               f"federation.num_clients={clients}", f"federation.min_clients={clients}", f"federation.rounds={rounds}",
               f"train.local_steps={args.local_steps}", "federation.client_cpus=1", *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return run_dir

    started = time.perf_counter()
    run_dir = simulate("fp32", args.clients, args.rounds)
    wall = time.perf_counter() - started
    transfer = {}
    for name, clients, extra in (("float16", args.clients, ["federation.transfer_dtype=float16"]),
                                 ("float16, FFA-LoRA r=4", args.clients, ["federation.transfer_dtype=float16",
                                                                          "lora.ffa=true", "lora.r=4", "lora.alpha=8"]),
                                 ("secure aggregation", 3, ["federation.secure_aggregation=true"])):
        other = simulate(name.replace(" ", "_").replace(",", "").replace("=", ""), clients, 1, *extra)
        line = json.loads((other / "metrics.jsonl").read_text().splitlines()[0])
        transfer[name] = {"bytes_up_per_client_round": statistics.median(c["bytes_up"] for c in line["clients"]),
                          "bytes_down_per_client_round": statistics.median(c["bytes_down"] for c in line["clients"])}
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    per_round = []
    for r in rounds:
        slowest = max((c.get("train_handler_seconds") or 0) + (c.get("eval", {}).get("seconds") or 0)
                      for c in r["clients"])
        per_round.append({"round": r["round"], "round_seconds": r["round_seconds"], "slowest_client_seconds": slowest,
                          "overhead_seconds": r["round_seconds"] - slowest,
                          "overhead_share": (r["round_seconds"] - slowest) / r["round_seconds"]})
    steady = per_round[1:] or per_round  # round 1 also starts Ray's workers
    bytes_up = [c["bytes_up"] for r in rounds for c in r["clients"]]
    result = {
        "benchmark": "federation_overhead",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "institutions": args.clients, "rounds": args.rounds, "local_steps": args.local_steps,
        "per_round": per_round,
        "overhead_share_median": statistics.median(p["overhead_share"] for p in steady),
        "overhead_seconds_median": statistics.median(p["overhead_seconds"] for p in steady),
        "round1_overhead_seconds": per_round[0]["overhead_seconds"],
        "bytes_up_per_client_round": statistics.median(bytes_up),
        "model_bytes": summary["bytes"]["base_model"],
        "bytes_share": statistics.median(bytes_up) / summary["bytes"]["base_model"],
        "simulate_wall_seconds": wall,
        "transfer": {"float32": {"bytes_up_per_client_round": statistics.median(bytes_up),
                                 "bytes_down_per_client_round": statistics.median(
                                     c["bytes_down"] for r in rounds for c in r["clients"])}, **transfer},
        "targets": {"overhead_share": 0.10, "bytes_share": 0.001},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    report(result, args.out)
    for p in per_round:
        print(f"round {p['round']}: {p['round_seconds']:.1f}s, slowest institution {p['slowest_client_seconds']:.1f}s, "
              f"overhead {p['overhead_seconds']:.1f}s ({100 * p['overhead_share']:.1f}%)")
    print(f"framework overhead (median of rounds 2+) = {100 * result['overhead_share_median']:.1f}% of a round "
          f"(target <= 10%); round 1 adds Ray worker start-up: {result['round1_overhead_seconds']:.1f}s")
    print(f"bytes up per institution per round = {result['bytes_up_per_client_round']:,} B = "
          f"{100 * result['bytes_share']:.3f}% of the {result['model_bytes']:,} B model (target <= 0.1%)")
    for name, t in result["transfer"].items():
        print(f"{name}: up {t['bytes_up_per_client_round']:,.0f} B ({100 * t['bytes_up_per_client_round'] / result['model_bytes']:.3f}% "
              f"of the model), down {t['bytes_down_per_client_round']:,.0f} B per institution per round")
    print(f"written to {args.out} (and .md, .png)")


def report(result: dict, out: Path) -> None:
    """The Markdown table and the PNG beside ``out`` (the JSON), from the result alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = result["model_bytes"]
    target_o, target_b = result["targets"]["overhead_share"], result["targets"]["bytes_share"]
    lines = [f"Measured {result['date']} on {result['machine']}; `fedslm simulate` of the icd10-hospitals scenario "
             f"with {result['institutions']} institutions, {result['rounds']} rounds × {result['local_steps']} local "
             "DP steps.", "", "| round | round wall | slowest institution | overhead |", "|---|---|---|---|"]
    for p in result["per_round"]:
        lines.append(f"| {p['round']} | {p['round_seconds']:.1f} s | {p['slowest_client_seconds']:.1f} s | "
                     f"{p['overhead_seconds']:.1f} s ({100 * p['overhead_share']:.1f}%) |")
    share = result["overhead_share_median"]
    lines += ["", f"Framework overhead, median of rounds 2+: **{100 * share:.1f}%** of a round "
              f"(target ≤ {100 * target_o:g}%: {'met' if share <= target_o else 'not met'}).", "",
              f"| transfer | up per institution per round | down | up / model ({model:,} B) |", "|---|---|---|---|"]
    for name, t in result["transfer"].items():
        up = t["bytes_up_per_client_round"]
        lines.append(f"| {name} | {up:,.0f} B | {t['bytes_down_per_client_round']:,.0f} B | {100 * up / model:.3f}% |")
    name, best = min(((n, t["bytes_up_per_client_round"] / model) for n, t in result["transfer"].items()),
                     key=lambda x: x[1])
    default = result["transfer"]["float32"]["bytes_up_per_client_round"] / model
    lines += ["", f"Target ≤ {100 * target_b:g}% of the model: {'met' if best <= target_b else 'not met'} by the "
              f"smallest transfer ({name}: {100 * best:.3f}%); the default float32 adapter: {100 * default:.3f}% "
              f"({'met' if default <= target_b else 'not met'})."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    rounds = [p["round"] for p in result["per_round"]]
    compute = [p["slowest_client_seconds"] for p in result["per_round"]]
    over = [p["overhead_seconds"] for p in result["per_round"]]
    a.bar(rounds, compute, label="slowest institution's compute")
    a.bar(rounds, over, bottom=compute, label="framework overhead", color="tab:red")
    a.set(xlabel="round", ylabel="seconds", title=f"Round wall time ({100 * share:.1f}% overhead after round 1)")
    a.set_xticks(rounds)
    a.legend(fontsize=8)
    names = list(result["transfer"])
    shares = [100 * result["transfer"][n]["bytes_up_per_client_round"] / model for n in names]
    b.bar([n.replace(", ", ",\n").replace("secure ", "secure\n") for n in names], shares, color="tab:blue")
    b.axhline(100 * target_b, color="grey", linestyle=":", label=f"target {100 * target_b:g}%")
    for x, v in enumerate(shares):
        b.text(x, v, f"{v:.3f}%", ha="center", va="bottom", fontsize=8)
    b.set(ylabel="% of the full model", title="Bytes up per institution per round")
    b.tick_params(axis="x", labelsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
