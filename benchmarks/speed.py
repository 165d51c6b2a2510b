"""Where `make run`'s time goes (issue 30): the feature pass, framework time per round, cold and warm runs.

    python benchmarks/speed.py [--records 4000] [--rounds 5] [--full] [--institutions 10 100 1000] [--merge]

Default (about 3 minutes on 2 cores):

- ``feature_pass``: the frozen MiniLM's sentence vectors (the head-only recipe, ``lora.layers: 0``) of
  ``--records`` ICD-10 records, in several ways: fedslm's pass (``fedslm.train.prefix.compute``:
  ``torch.inference_mode``, records sorted by length, each batch padded to its longest record) with 1
  thread and with all cores, and against it the naive pass (records in file order, every batch
  padded to ``model.max_length``, ``torch.no_grad``) and batch sizes; records/s, the extrapolated time
  for the scenario's 48,671 records, and the largest difference to fedslm's vectors (fp32 throughout);
- ``framework``: a short simulation of `make run`'s scenario (``--rounds`` rounds, at most 2,000
  training records, an empty feature cache of its own) and, per round, ``round_seconds`` from its
  ``metrics.jsonl`` minus the nodes' own ``train_seconds`` (the slowest node's: nodes run side by
  side; and all nodes' summed, the bound when they take turns on too few cores): what Flower, Ray,
  message encoding and the coordinator cost.

``--institutions N ...`` runs `make run`'s scenario with N simulated institutions each (``--institution-rounds``,
3 by default): wall time per round and the peak memory of the whole process tree.

``--full`` adds `make run`'s scenario end to end: cold (an empty feature cache) and then warm (the
cache the cold run filled), wall time and fixed-test accuracy each, and the feature pass over all
records. Minutes; run it on an idle machine.

Writes benchmarks/results/speed.json and speed.md with the machine and versions. Every figure is wall
time on whatever else the machine runs: on a shared machine they are noisy (the load average is
recorded beside them).
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
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCENARIO = ROOT / "simulations" / "icd10-hospitals.yaml"
ALL_RECORDS = 48_671


def _cpu() -> float:
    """CPU seconds of this process so far, all threads (user + system)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine() -> dict:
    import flwr
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "flwr": flwr.__version__,
            "transformers": transformers.__version__, "load_average": list(os.getloadavg()),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _variant(model, enc, batch_size: int, *, sort: bool, pad_to: int | None, no_grad: bool):
    """A feature pass like fedslm's but with one choice changed: file order (``sort=False``), every batch
    padded to ``pad_to`` tokens, or ``torch.no_grad`` instead of ``torch.inference_mode``."""
    import torch

    from fedslm.data.tasks import _pad
    from fedslm.train.prefix import _mask, _parts, _pool

    encoder, _, _ = _parts(model)
    encoder.eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i])) if sort else list(range(len(enc)))
    out = torch.zeros(len(enc), encoder.config.hidden_size)
    with (torch.no_grad() if no_grad else torch.inference_mode()):
        for start in range(0, len(enc), batch_size):
            rows = order[start:start + batch_size]
            seqs = [enc.input_ids[i] for i in rows]
            if pad_to:
                seqs = seqs + [[enc.pad_id] * pad_to]  # widens the batch to pad_to; the extra row is dropped
            ids, mask = _pad(seqs, enc.pad_id)
            if pad_to:
                ids, mask = ids[:-1], mask[:-1]
            h = encoder.embeddings(input_ids=ids)
            ext = _mask(encoder, h, mask)
            for layer in encoder.encoder.layer:
                h = layer(h, ext)
            out[torch.as_tensor(rows)] = _pool(encoder, h, mask).float()
    return out


def feature_pass(records: int, *, repeats: int = 1, only_fedslm: bool = False) -> dict:
    import torch

    from fedslm.config import load_config
    from fedslm.data import load_task_data
    from fedslm.data.tasks import Encoded, get_task
    from fedslm.models import load_base
    from fedslm.train import prefix

    cfg = load_config([SCENARIO])
    data = load_task_data(cfg.data, cfg.model.task)
    base = load_base(cfg.model, len(data.labels))
    whole = data.train + data.test
    # A spread sample of the records (every k-th), so lengths are as in the whole set.
    step = max(1, len(whole) // records)
    enc = get_task(cfg.model.task).encode(whole[::step][:records], base.tokenizer, cfg.model.max_length)
    enc = Encoded(enc.input_ids, enc.targets, enc.pad_id)
    n = len(enc)
    cpus = os.cpu_count() or 1
    before = torch.get_num_threads()
    rows, reference = [], None

    def timed(name: str, threads: int, fn) -> None:
        nonlocal reference
        torch.set_num_threads(threads)
        times, cpu = [], []
        for _ in range(repeats):
            start, used = time.perf_counter(), _cpu()
            vectors = fn()
            times.append(time.perf_counter() - start)
            cpu.append(_cpu() - used)
        seconds, cpu_seconds = statistics.median(times), statistics.median(cpu)
        if reference is None:
            reference = vectors
        diff = float((vectors - reference).abs().max())
        cos = float(torch.nn.functional.cosine_similarity(vectors, reference, dim=-1).min())
        rows.append({"variant": name, "threads": threads, "records": n, "seconds": seconds,
                     "records_per_s": n / seconds, "cpu_seconds": cpu_seconds, "records_per_cpu_s": n / cpu_seconds, "extrapolated_all_s": ALL_RECORDS * seconds / n,
                     "max_abs_diff_vs_fedslm": diff, "min_cosine_vs_fedslm": cos})
        print(f"  {name:<48} {threads} thr  {n / seconds:8.0f} rec/s  {n / cpu_seconds:6.0f} rec/cpu-s  "
              f"{ALL_RECORDS * seconds / n:6.0f} s for "
              f"{ALL_RECORDS}  (max |diff| {diff:.1e}, min cosine {cos:.6f})", flush=True)

    from fedslm.train.device import feature_precision

    default = feature_precision(cfg.model.feature_precision, torch.device("cpu"))
    try:
        # The reference every other row is compared with: fp32, fedslm's pass (a CPU without native bf16 runs it).
        fedslm = "fedslm (inference_mode, sorted, dynamic pad, b256)"
        timed(fedslm, cpus, lambda: prefix.compute(base.model, enc, 0).hidden)
        if default != "fp32":  # what model.feature_precision: auto runs on this machine
            timed(f"fedslm in {default} (model.feature_precision: auto here)", cpus,
                  lambda: prefix.compute(base.model, enc, 0, precision=default).hidden)
        if only_fedslm:
            return {"records": n, "default_precision": default, "variants": rows}
        # One thread: records per CPU-second compares the variants' work even on a loaded machine.
        timed(fedslm, 1, lambda: prefix.compute(base.model, enc, 0).hidden)
        timed("no_grad instead of inference_mode", 1,
              lambda: _variant(base.model, enc, 256, sort=True, pad_to=None, no_grad=True))
        timed("file order (not sorted), dynamic pad", 1,
              lambda: _variant(base.model, enc, 256, sort=False, pad_to=None, no_grad=False))
        timed("sorted, padded to max_length", 1,
              lambda: _variant(base.model, enc, 256, sort=True, pad_to=cfg.model.max_length, no_grad=False))
        timed("naive: file order, max_length, no_grad", 1,
              lambda: _variant(base.model, enc, 256, sort=False, pad_to=cfg.model.max_length, no_grad=True))
        for b in (64, 1024):
            timed(f"fedslm, batch {b}", 1, lambda b=b: prefix.compute(base.model, enc, 0, batch_size=b).hidden)
        # The other candidate: int8 dynamic quantisation of every Linear layer (torch.ao, weights int8,
        # activations quantised per batch). Fast, but see its cosine: not an option for the default.
        import copy
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice (torchao is not installed here)
            int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base.model), {torch.nn.Linear},
                                                          dtype=torch.qint8)
        timed("int8 dynamic quantisation (torch.ao, Linear layers)", cpus,
              lambda: prefix.compute(int8, enc, 0).hidden)
    finally:
        torch.set_num_threads(before)
    lengths = sorted(len(i) for i in enc.input_ids)
    return {"records": n, "default_precision": default, "max_length": cfg.model.max_length, "mean_tokens": sum(lengths) / n,
            "median_tokens": lengths[n // 2], "variants": rows}


def _simulate(out: Path, cache: Optional[Path], overrides: list[str]) -> dict:
    """``cache``: the feature cache folder (None: the user's, make run's)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if cache is not None:
        env["FEDSLM_CACHE_DIR"] = str(cache)
    cmd = [str(Path(sys.executable).parent / "fedslm"), "simulate", "--config", str(SCENARIO), "--out", str(out),
           *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"fedslm simulate failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    rounds = []
    for line in lines:
        train = [c.get("train_seconds") or 0.0 for c in line["clients"]]
        rounds.append({"round": line["round"], "round_seconds": line["round_seconds"],
                       "train_seconds_max": max(train, default=0.0), "train_seconds_sum": sum(train),
                       "framework_seconds": line["round_seconds"] - max(train, default=0.0),
                       "framework_seconds_if_serial": line["round_seconds"] - sum(train)})
    later = rounds[1:] or rounds  # round 1 also loads the base and data in every actor
    fixed = summary.get("fixed_test") or {}
    return {"wall_seconds": wall, "wall_seconds_simulation": summary.get("wall_seconds_simulation"),
            "fixed_test_accuracy": fixed.get("accuracy"), "rounds": rounds,
            "round1_seconds": rounds[0]["round_seconds"] if rounds else None,
            "framework_seconds_per_round_median": statistics.median(r["framework_seconds"] for r in later)
            if later else None,
            "round_seconds_median_after_round1": statistics.median(r["round_seconds"] for r in later)
            if later else None}


def framework(rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedslm-speed-") as tmp:
        res = _simulate(Path(tmp) / "run", Path(tmp) / "cache",
                        [f"federation.rounds={rounds}", "data.max_train_records=2000"])
    res["setup"] = f"make run's scenario, {rounds} rounds, data.max_train_records=2000, an empty feature cache"
    return res


def end_to_end() -> dict:
    with tempfile.TemporaryDirectory(prefix="fedslm-speed-full-") as tmp:
        cache = Path(tmp) / "cache"
        cold = _simulate(Path(tmp) / "cold", cache, [])
        warm = _simulate(Path(tmp) / "warm", cache, [])
    return {"cold": cold, "warm": warm, "targets": {"cold_s": 180, "warm_s": 45, "fixed_test_accuracy": 0.90}}


def precision_accuracy(seeds: int) -> dict:
    """make run's scenario (warm, on the user's feature cache) with model.feature_precision auto and fp32 under
    the same DP noise seeds: what the bf16 vectors change in fixed-test accuracy, seed by seed."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedslm-speed-precision-") as tmp:
        for seed in range(11, 11 + seeds):
            row: dict = {"noise_seed": seed}
            for precision in ("auto", "fp32"):
                out = Path(tmp) / f"{precision}-{seed}"
                res = _simulate(out, None, [f"privacy.noise_seed={seed}", f"model.feature_precision={precision}"])
                summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
                row[precision] = {"accuracy": res["fixed_test_accuracy"],
                                  "macro_f1": (summary.get("fixed_test") or {}).get("macro_f1")}
            rows.append(row)
            print(f"  noise seed {seed}: auto {row['auto']['accuracy']:.4f}, fp32 {row['fp32']['accuracy']:.4f}", flush=True)
    diffs = [100 * (r["auto"]["accuracy"] - r["fp32"]["accuracy"]) for r in rows]
    return {"rows": rows, "mean_difference_points": statistics.mean(diffs),
            "stdev_difference_points": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "setup": "make run's scenario, warm, privacy.noise_seed=s, model.feature_precision auto vs fp32"}


def institutions(sizes: list[int], rounds: int) -> dict:
    """make run's scenario with ``n`` simulated institutions (Dirichlet shares of the same records, 50 held-out
    records each): wall time per round and the process tree's peak memory (benchmarks/scale.py's sampler),
    on the user's feature cache (the one `make run` fills: the shared pass is measured by --full)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fedslm_bench_scale", ROOT / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)  # type: ignore[union-attr]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedslm-speed-scale-") as tmp:
        for n in sizes:
            out = Path(tmp) / f"n{n}"
            cmd = [str(Path(sys.executable).parent / "fedslm"), "simulate", "--config", str(SCENARIO), "--out",
                   str(out), f"federation.num_clients={n}", f"federation.min_clients={max(1, n // 2)}",
                   f"federation.rounds={rounds}", "data.max_test_records=50"]
            started = time.perf_counter()
            # The user's feature cache, make run's (the cold pass is measured by --full).
            rc, pss, rss = scale.sampled(cmd, Path(tmp) / f"n{n}.log")
            wall = time.perf_counter() - started
            if rc != 0:
                raise SystemExit(f"{n} institutions: fedslm simulate failed ({(Path(tmp) / f'n{n}.log').read_text()[-2000:]})")
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
            secs = [line["round_seconds"] for line in lines]
            row = {"institutions": n, "rounds": rounds, "wall_seconds": wall, "round_seconds": secs,
                   "round_seconds_median_after_round1": statistics.median(secs[1:] or secs),
                   "peak_pss_mb": pss / 2**20, "peak_rss_sum_mb": rss / 2**20}
            print(f"  {n} institutions: rounds {', '.join(f'{x:.1f}s' for x in secs)}; whole run {wall:.0f} s; "
                  f"peak PSS {row['peak_pss_mb']:.0f} MB", flush=True)
            rows.append(row)
    return {"rows": rows, "setup": f"make run's scenario, {rounds} rounds, federation.num_clients=n, "
                                   "min_clients=n/2, data.max_test_records=50, make run's (warm) feature cache",
            "targets": {"pss_mb_at_100": 4096}}


def _measured(section: dict) -> str:
    m = section.get("machine") or {}
    return (f"Measured {m.get('when', '?')}, load average {', '.join(f'{x:.1f}' for x in m.get('load_average', []))} "
            f"on {m.get('cpus', '?')} CPUs.") if m else ""


def write(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    m = result["machine"]
    md = ["# Speed (issue 30)", "",
          f"{m['when']}; {m['platform']}, {m['cpus']} CPUs (load average {', '.join(f'{x:.1f}' for x in m['load_average'])} "
          f"at the start: a shared machine's figures are noisy); Python {m['python']}, torch {m['torch']}, "
          f"flwr {m['flwr']}, transformers {m['transformers']}. `python benchmarks/speed.py"
          f"{' --full' if 'end_to_end' in result else ''}` wrote this.", ""]
    fp = result.get("feature_pass")
    if fp:
        md += [f"## Feature pass: frozen MiniLM sentence vectors, {fp['records']} records (mean {fp['mean_tokens']:.1f} "
               f"tokens, max_length {fp['max_length']}); fp32 unless a row says otherwise (model.feature_precision: auto "
               f"runs {fp.get('default_precision', 'fp32')} on this machine)", "", _measured(fp), "",
               "| variant | threads | records/s | records per CPU-s | s for 48,671 records (extrapolated) | "
               "max abs diff to fedslm's fp32 | min cosine to it |", "|---|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {r['variant']} | {r['threads']} | {r['records_per_s']:.0f} | {r.get('records_per_cpu_s', float('nan')):.0f} "
               f"| {r['extrapolated_all_s']:.0f} | "
               f"{r['max_abs_diff_vs_fedslm']:.1e} | {r.get('min_cosine_vs_fedslm', float('nan')):.6f} |" for r in fp["variants"]]
        md.append("")
    if result.get("feature_pass_all"):
        md += [_measured(result["feature_pass_all"]), ""]
        for r in result["feature_pass_all"]["variants"]:
            md += [f"All {r['records']} records, {r['variant']} on {r['threads']} threads: {r['seconds']:.0f} s "
                   f"({r['records_per_s']:.0f} records/s; min cosine to fp32 {r.get('min_cosine_vs_fedslm', 1.0):.6f}; "
                   "target ≤ 60 s on 2 cores).", ""]
    fw = result.get("framework")
    if fw:
        md += ["## Framework time per simulated round", "", _measured(fw), "", fw["setup"] + ". Framework time = round_seconds minus "
               "the slowest node's train_seconds (nodes train side by side).", "",
               "| round | round s | slowest node's train s | all nodes' train s | framework s |",
               "|---:|---:|---:|---:|---:|"]
        md += [f"| {r['round']} | {r['round_seconds']:.2f} | {r['train_seconds_max']:.3f} | {r['train_seconds_sum']:.3f} "
               f"| {r['framework_seconds']:.2f} |" for r in fw["rounds"]]
        md += ["", f"Median framework time per round after round 1: {fw['framework_seconds_per_round_median']:.2f} s; "
               f"the whole command {fw['wall_seconds']:.0f} s.", ""]
    e2e = result.get("end_to_end")
    if e2e:
        md += ["## `make run`'s scenario end to end", "", _measured(e2e), "", "| cache | wall s | simulation s | round 1 s | "
               "median round s after 1 | fixed-test accuracy |", "|---|---:|---:|---:|---:|---:|"]
        for k in ("cold", "warm"):
            r = e2e[k]
            md.append(f"| {k} | {r['wall_seconds']:.0f} | {r['wall_seconds_simulation'] or float('nan'):.0f} | "
                      f"{r['round1_seconds'] or float('nan'):.1f} | {r['round_seconds_median_after_round1'] or float('nan'):.2f} "
                      f"| {r['fixed_test_accuracy'] or float('nan'):.4f} |")
        md += ["", "Targets: cold ≤ 180 s, warm ≤ 45 s, fixed-test accuracy ≥ 0.90.", ""]
    else:
        md += ["Cold and warm `make run` end to end: not measured here (`python benchmarks/speed.py --full`, on an "
               "idle machine).", ""]
    inst = result.get("institutions")
    if inst:
        md += ["## Many simulated institutions", "", _measured(inst), "", inst["setup"] + ". Memory: the whole process "
               "tree (fedslm, the SuperLink, Ray and its workers), PSS (shared pages split among their sharers) and "
               "the sum of RSS.", "",
               "| institutions | rounds | round 1 s | median round s after 1 | whole run s | peak PSS MB | sum of RSS MB |",
               "|---:|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {r['institutions']} | {r['rounds']} | {r['round_seconds'][0]:.1f} | "
               f"{r['round_seconds_median_after_round1']:.2f} | {r['wall_seconds']:.0f} | {r['peak_pss_mb']:.0f} | "
               f"{r['peak_rss_sum_mb']:.0f} |" for r in inst["rows"]]
        md += ["", "Target: 100 institutions within 4 GB; 1,000 complete.", ""]
    prec = result.get("precision")
    if prec:
        md += ["## What bf16 feature vectors change in accuracy", "", _measured(prec), "", prec["setup"] + ".", "",
               "| noise seed | accuracy, auto | accuracy, fp32 | macro-F1, auto | macro-F1, fp32 |", "|---:|---:|---:|---:|---:|"]
        md += [f"| {r['noise_seed']} | {r['auto']['accuracy']:.4f} | {r['fp32']['accuracy']:.4f} | "
               f"{r['auto']['macro_f1']:.4f} | {r['fp32']['macro_f1']:.4f} |" for r in prec["rows"]]
        sd = prec.get("stdev_difference_points")
        md += ["", f"Mean difference (auto − fp32): {prec['mean_difference_points']:+.2f} points"
               + (f" (standard deviation {sd:.2f} over the seeds)" if sd is not None else "") + ".", ""]
    if result.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    (RESULTS / "speed.md").write_text("\n".join(md), encoding="utf-8")
    plot(result)


def plot(result: dict) -> None:
    """speed.png: make run cold and warm against the targets; seconds per round and peak memory against
    the number of institutions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e, inst = result.get("end_to_end"), result.get("institutions")
    if not e2e and not inst:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    if e2e:
        ax = axes[0]
        names = ["cold", "warm"]
        ax.bar(names, [e2e[k]["wall_seconds"] for k in names], color=["#4c72b0", "#55a868"])
        for i, k in enumerate(names):
            goal = e2e["targets"][f"{k}_s"]
            ax.hlines(goal, i - 0.4, i + 0.4, colors="red", linestyles="dashed")
            ax.text(i, e2e[k]["wall_seconds"], f"{e2e[k]['wall_seconds']:.0f} s\n{e2e[k]['fixed_test_accuracy']:.1%}",
                    ha="center", va="bottom", fontsize=9)
        ax.set(title="make run end to end (red: target)", ylabel="s")
    if inst:
        rows = sorted(inst["rows"], key=lambda r: r["institutions"])
        n = [r["institutions"] for r in rows]
        axes[1].plot(n, [r["round_seconds_median_after_round1"] for r in rows], "o-")
        axes[1].set(xscale="log", title="Median round after round 1", xlabel="institutions", ylabel="s")
        axes[2].plot(n, [r["peak_pss_mb"] / 1024 for r in rows], "o-", label="peak PSS")
        axes[2].plot(n, [r["peak_rss_sum_mb"] / 1024 for r in rows], "s--", label="sum of RSS")
        axes[2].axhline(4, color="red", linestyle="dashed", label="target at 100")
        axes[2].set(xscale="log", title="Process tree memory", xlabel="institutions", ylabel="GB", ylim=(0, None))
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "speed.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=4000, help="records in the feature-pass sample")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the short simulation")
    ap.add_argument("--full", action="store_true", help="also cold and warm `make run` end to end and the "
                    "feature pass over all records (minutes; an idle machine)")
    ap.add_argument("--skip-framework", action="store_true", help="no short simulation")
    ap.add_argument("--skip-features", action="store_true", help="no feature-pass variants")
    ap.add_argument("--institutions", type=int, nargs="*", default=None, metavar="N",
                    help="also make run's scenario with N simulated institutions each (e.g. 10 100 1000)")
    ap.add_argument("--institution-rounds", type=int, default=3, help="rounds of each --institutions run")
    ap.add_argument("--precision-seeds", type=int, default=0, metavar="N",
                    help="also N noise seeds of make run (warm) with model.feature_precision auto and fp32 each")
    ap.add_argument("--merge", action="store_true", help="keep the sections of results/speed.json this run "
                    "does not measure (each keeps the machine line it was measured with)")
    args = ap.parse_args()
    result: dict = {"machine": machine()}
    if args.merge and (RESULTS / "speed.json").is_file():
        old = json.loads((RESULTS / "speed.json").read_text(encoding="utf-8"))
        result["notes"] = old.get("notes", [])
        for key in ("feature_pass", "feature_pass_all", "framework", "end_to_end", "institutions", "precision"):
            if key in old:
                result[key] = {**old[key], "machine": old[key].get("machine", old.get("machine"))}
    if not args.skip_features:
        print(f"feature pass over {args.records} records:", flush=True)
        result["feature_pass"] = {**feature_pass(args.records), "machine": result["machine"]}
    if args.full:
        print("feature pass over all records:", flush=True)
        result["feature_pass_all"] = {**feature_pass(ALL_RECORDS, only_fedslm=True), "machine": result["machine"]}
    if not args.skip_framework:
        print(f"short simulation ({args.rounds} rounds):", flush=True)
        result["framework"] = {**framework(args.rounds), "machine": result["machine"]}
        print(f"  framework time per round (median after round 1): "
              f"{result['framework']['framework_seconds_per_round_median']:.2f} s", flush=True)
    if args.full:
        print("make run's scenario, cold then warm:", flush=True)
        result["end_to_end"] = {**end_to_end(), "machine": result["machine"]}
        for k in ("cold", "warm"):
            r = result["end_to_end"][k]
            print(f"  {k}: {r['wall_seconds']:.0f} s, fixed-test accuracy {r['fixed_test_accuracy']}", flush=True)
    if args.precision_seeds:
        print(f"feature precision, {args.precision_seeds} noise seeds each:", flush=True)
        result["precision"] = {**precision_accuracy(args.precision_seeds), "machine": result["machine"]}
    if args.institutions:
        print(f"make run's scenario with {', '.join(map(str, args.institutions))} institutions:", flush=True)
        result["institutions"] = {**institutions(args.institutions, args.institution_rounds),
                                  "machine": result["machine"]}
    write(result)
    print(f"wrote {RESULTS / 'speed.json'} and speed.md")


if __name__ == "__main__":
    main()
