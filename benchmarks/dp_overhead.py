"""DP-LoRA vs non-DP LoRA on the bundled MiniLM: step-time and peak-RSS ratios.

Both variants run the same records in the same batches, at the same sequence
length and thread count, each in its own fresh process (peak RSS is a
per-process high-water mark), interleaved plain/DP/plain/DP so drift on the
machine hits both alike. Prints the two ratios and writes them as JSON.

    python benchmarks/dp_overhead.py [--batch 64] [--steps 12] [--threads 2] [--repeats 2]

Targets (issue 2): time ratio <= 1.05, memory ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(mode: str, batch: int, steps: int, threads: int, max_length: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from fedslm.config import load_config
    from fedslm.data.tasks import get_task
    from fedslm.privacy.dpsgd import DPSGD, PlainSGD, make_optimizer
    from fedslm.train.losses import PER_RECORD_LOSS
    from fedslm.train.node import build_node

    cfg = load_config(overrides=[f"model.max_length={max_length}", f"train.batch_size={batch}",
                                 f"train.physical_batch_size={batch}", "data.max_test_records=1"])
    node = build_node(cfg)
    task = get_task("classification")
    loss_of = PER_RECORD_LOSS["classification"]
    # Records with the longest token sequences, so both variants see exactly max_length tokens per row.
    order = sorted(range(len(node.train)), key=lambda i: -len(node.train.input_ids[i]))
    batches = [order[k * batch:(k + 1) * batch] for k in range(warmup + steps)]
    params = [p for p in node.model.parameters() if p.requires_grad]
    opt = make_optimizer(params, "adamw", 1e-3, 0.0)
    rss_loaded = _rss_mb()
    if mode == "dp":
        engine = DPSGD(node.model, optimizer=opt, noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=batch, physical_batch_size=batch,
                       noise_generator=torch.Generator().manual_seed(0))
    else:
        engine = PlainSGD(node.model, optimizer=opt, physical_batch_size=batch)

    def loss_fn(module, idx):
        return loss_of(module, task.collate(node.train, idx))

    times = []
    for k, b in enumerate(batches):
        t0 = time.perf_counter()
        engine.step(b, loss_fn)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    seq = max(len(node.train.input_ids[i]) for i in batches[0])
    return {"mode": mode, "step_s": statistics.median(times), "step_s_all": times,
            "rss_loaded_mb": rss_loaded, "peak_rss_mb": _rss_mb(), "seq_len": seq,
            "trainable_params": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", choices=["dp", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "dp_overhead.json")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.steps, args.threads, args.max_length, args.warmup)))
        return

    runs: dict[str, list[dict]] = {"plain": [], "dp": []}
    for rep in range(args.repeats):
        for mode in ("plain", "dp"):
            cmd = [sys.executable, __file__, "--worker", mode, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--max-length", str(args.max_length)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            runs[mode].append(res)
            print(f"[{rep + 1}/{args.repeats}] {mode:5s}: {res['step_s'] * 1000:8.1f} ms/step, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)

    plain_t = statistics.median(r["step_s"] for r in runs["plain"])
    dp_t = statistics.median(r["step_s"] for r in runs["dp"])
    plain_m = statistics.median(r["peak_rss_mb"] for r in runs["plain"])
    dp_m = statistics.median(r["peak_rss_mb"] for r in runs["dp"])
    result = {
        "benchmark": "dp_overhead",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}",
        "model": "minilm (all-MiniLM-L6-v2) + LoRA r=8 on query,value + classifier head",
        "batch": args.batch, "seq_len": runs["dp"][0]["seq_len"], "threads": args.threads, "steps": args.steps,
        "plain_step_s": plain_t, "dp_step_s": dp_t, "time_ratio": dp_t / plain_t,
        "plain_peak_rss_mb": plain_m, "dp_peak_rss_mb": dp_m, "memory_ratio": dp_m / plain_m,
        "targets": {"time_ratio": 1.05, "memory_ratio": 1.15},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"time ratio   DP/plain = {result['time_ratio']:.3f}  (target <= 1.05)")
    print(f"memory ratio DP/plain = {result['memory_ratio']:.3f}  (target <= 1.15)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
