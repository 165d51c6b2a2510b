"""Scale: many simulated institutions on one machine — wall time per round and the peak memory of the
whole process tree (fedslm, the SuperLink, Ray and its workers), sampled every 0.5 s with psutil: the
sum of PSS (shared pages split among their sharers: the tree's real footprint) and, for reference, the
sum of RSS (which counts shared libraries and Ray's object store once per process).

Each institution does the `make run` work at a smaller size (2 local DP steps, 50 held-out records)
so that the figures show how the framework grows with the number of institutions, not how long
MiniLM trains.

    python benchmarks/scale.py --institutions 10 50 100 [--rounds 3]
    python benchmarks/scale.py --quick     # 10 institutions, 2 rounds

Writes benchmarks/results/scale{,_quick}.{json,md,png}. Target (issue 7): 100 institutions within 6 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over the tree. RSS counts shared pages (libraries, Ray's object store)
    once per process; PSS splits them among the processes sharing them, so its sum is the tree's real
    footprint."""
    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return rss, pss


def sampled(cmd: list[str], log_path: Path, env: dict | None = None) -> tuple[int, int, int]:
    """Run ``cmd`` (output to ``log_path``) and sample its process tree every 0.5 s: (exit code, peak sum of
    PSS, peak sum of RSS), in bytes."""
    peak = peak_rss = 0
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        ps = psutil.Process(proc.pid)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, peak_rss
            while not done.is_set():
                rss, pss = _tree_memory(ps)
                peak, peak_rss = max(peak, pss), max(peak_rss, rss)
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
    return rc, peak, peak_rss


def run(n: int, rounds: int, work: Path) -> dict:
    out = work / f"n{n}"
    cmd = [sys.executable, "-m", "fedslm.cli.main", "simulate", "-c", str(ROOT / "simulations/icd10-hospitals-lora-every-layer.yaml"),
           "--out", str(out), f"federation.num_clients={n}", f"federation.min_clients={max(1, n // 2)}",
           f"federation.rounds={rounds}", "train.local_steps=2", "data.max_test_records=50",
           "federation.partitioner=iid"]
    started = time.perf_counter()
    rc, peak, peak_rss = sampled(cmd, work / f"n{n}.log")
    if rc != 0:
        raise SystemExit(f"{n} institutions: fedslm simulate failed (log {work / f'n{n}.log'})")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row = {"institutions": n, "rounds": rounds, "wall_seconds": time.perf_counter() - started,
           "round_seconds": [r["round_seconds"] for r in lines], "peak_pss_mb": peak / 2**20,
           "peak_rss_sum_mb": peak_rss / 2**20,
           "clients_per_round": [len([c for c in r["clients"] if "train_loss" in c]) for r in lines]}
    print(f"{n} institutions: rounds {', '.join(f'{s:.0f}s' for s in row['round_seconds'])}; process tree peak "
          f"PSS {row['peak_pss_mb']:.0f} MB (sum of RSS {row['peak_rss_sum_mb']:.0f} MB)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--institutions", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    quick = args.quick or os.environ.get("QUICK") == "1"
    sizes, rounds = ([10], 2) if quick else (args.institutions, args.rounds)
    work = Path(tempfile.mkdtemp(prefix="fedslm-scale-"))
    rows = [run(n, rounds, work) for n in sizes]
    result = {"benchmark": "scale", "quick": quick, "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
              "rows": rows, "target_peak_mb_at_100": 6 * 1024}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / ("scale_quick" if quick else "scale")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [f"Measured {result['date']} on {result['machine']}.", "",
          "| institutions | rounds | median round | whole run | peak PSS (process tree) | sum of RSS | per institution |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        med = sorted(r["round_seconds"])[len(r["round_seconds"]) // 2]
        md.append(f"| {r['institutions']} | {r['rounds']} | {med:.0f} s | {r['wall_seconds']:.0f} s | "
                  f"{r['peak_pss_mb']:.0f} MB | {r['peak_rss_sum_mb']:.0f} MB | {med / r['institutions']:.2f} s/round |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(result, stem.with_suffix(".png"))
    print("\n".join(md))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["rows"], key=lambda r: r["institutions"])
    n = [r["institutions"] for r in rows]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_m.plot(n, [r["peak_pss_mb"] / 1024 for r in rows], "o-", label="peak PSS (process tree)")
    ax_m.plot(n, [r["peak_rss_sum_mb"] / 1024 for r in rows], "s--", label="sum of RSS")
    ax_m.axhline(result["target_peak_mb_at_100"] / 1024, color="tab:red", linestyle=":", label="target at 100")
    ax_m.set(xlabel="institutions", ylabel="GB", title="Peak memory", ylim=(0, None))
    ax_m.legend(fontsize=8)
    ax_t.plot(n, [sorted(r["round_seconds"])[len(r["round_seconds"]) // 2] for r in rows], "o-")
    ax_t.set(xlabel="institutions", ylabel="s", title="Median round wall time", ylim=(0, None))
    fig.suptitle(f"{result['machine']}, {result['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
