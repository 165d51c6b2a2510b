"""Figures of fedslm on one accelerator: what it is, DP vs non-DP step time and peak memory, tokens/s,
fp32 vs bf16, and the accuracy of a short DP run in each precision. Run by benchmarks/gpu_check.sh.

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--tiny] [--out benchmarks/results/gpu-DATE.json]

The model is the bundled MiniLM on the bundled ICD-10 records (both ship in the project's
dependencies); ``--tiny`` (or a machine without them) uses a tiny BERT and synthetic records built in
process, which checks the path, not the figures. Step times: DP and non-DP on two copies of the model,
steps alternated (median), synchronised with the device. Peak memory: each variant alone, the peak
above the memory resident before its steps (models, data), from torch's allocator. Accuracy: one round
of DP-SGD (ε = 8) with LoRA on every layer, the same batches and noise in both precisions.
A device torch does not see is refused in one line (exit status 2); nothing is written then.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_facts(device) -> dict:
    import torch

    from fedslm.train.device import bf16_supported, torch_sees

    facts = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
             "torch_sees": torch_sees(), "bf16": bf16_supported(device), "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(name=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gb=round(props.total_memory / 2**30, 1))
    else:
        facts["name"] = platform.processor() or platform.machine()
    return facts


def _tiny_overrides(folder: Path) -> list[str]:
    """A tiny BERT and 600 synthetic records of 3 classes, written to ``folder`` (no bundled files needed)."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = {"cardio": "heart chest pain pressure".split(), "resp": "lung cough fever breath".split(),
             "ortho": "fracture bone arm leg".split()}
    filler = "the of with left right acute chronic mild severe".split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted({w for ws in words.values()
                                                                                     for w in ws} | set(filler)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    torch.manual_seed(0)
    model_dir = folder / "tiny-bert"
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64, pad_token_id=0)).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(600):
        label = sorted(words)[i % 3]
        text = rng.choices(words[label], k=rng.randint(2, 5)) + rng.choices(filler, k=rng.randint(0, 6))
        rng.shuffle(text)
        lines.append(f"{' '.join(text)},{label}")
    data = folder / "records.csv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [f"model.name={model_dir}", f"data.source={data}", "model.max_length=24"]


def _bundled_ok() -> bool:
    try:
        from fedslm.models import presets

        presets.get("minilm").locate()
        import icdlookup  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - any missing piece: fall back to the tiny model
        return False


def step_figures(overrides: list[str], device, precision: str, batch: int, steps: int, warmup: int = 2) -> dict:
    import torch

    from fedslm.config import load_config
    from fedslm.data.tasks import get_task
    from fedslm.privacy.dpsgd import DPSGD, PlainSGD, make_optimizer
    from fedslm.train.device import to_device
    from fedslm.train.losses import PER_RECORD_LOSS
    from fedslm.train.node import build_node

    cfg = load_config(overrides=[*overrides, f"train.batch_size={batch}", "data.max_test_records=1",
                                 f"data.max_train_records={batch * (warmup + steps)}"])
    node = build_node(cfg, device)
    task, loss_of = get_task("classification"), PER_RECORD_LOSS["classification"]
    # The longest records first, so every batch runs near max_length tokens per row.
    order = sorted(range(len(node.train)), key=lambda i: -len(node.train.input_ids[i]))
    batches = [order[k * batch:(k + 1) * batch] for k in range(warmup + steps)]
    batches = [b for b in batches if len(b) == batch] or [order[:batch]]

    def loss_fn(module, idx):
        return loss_of(module, to_device(task.collate(node.train, idx), device))

    def engine(mode: str, model):
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", 1e-3, 0.0)
        if mode == "dp":
            return DPSGD(model, optimizer=opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                         physical_batch_size=batch, noise_generator=torch.Generator().manual_seed(0),
                         precision=precision)
        return PlainSGD(model, optimizer=opt, physical_batch_size=batch, precision=precision)

    engines = {"plain": engine("plain", copy.deepcopy(node.model)), "dp": engine("dp", node.model)}
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for k, b in enumerate(batches):
        for mode in (("plain", "dp") if k % 2 == 0 else ("dp", "plain")):
            _sync(device)
            t0 = time.perf_counter()
            engines[mode].step(b, loss_fn)
            _sync(device)
            if k >= min(warmup, len(batches) - 1):
                times[mode].append(time.perf_counter() - t0)
    memory = {}
    for mode in ("plain", "dp"):
        if device.type != "cuda":
            memory[mode] = None
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        engines[mode].step(batches[0], loss_fn)
        _sync(device)
        memory[mode] = round((torch.cuda.max_memory_allocated(device) - resident) / 2**20, 1)
    for e in engines.values():
        e.close()
    tokens = statistics.median(sum(len(node.train.input_ids[i]) for i in b) for b in batches)
    plain, dp = statistics.median(times["plain"]), statistics.median(times["dp"])
    return {"precision": precision, "batch": batch, "tokens_per_step": tokens, "plain_step_s": plain,
            "dp_step_s": dp, "dp_over_plain": dp / plain, "plain_tokens_per_s": tokens / plain,
            "dp_tokens_per_s": tokens / dp, "plain_peak_step_memory_mb": memory["plain"],
            "dp_peak_step_memory_mb": memory["dp"],
            "trainable_params": sum(p.numel() for p in node.model.parameters() if p.requires_grad)}


def accuracy_run(overrides: list[str], device, precision: str, steps: int, records: int, ledger_dir: Path) -> dict:
    from fedslm.config import load_config
    from fedslm.privacy import Ledger
    from fedslm.train.evaluate import evaluate
    from fedslm.train.local import round_spec, train_round
    from fedslm.train.node import build_node

    cfg = load_config(overrides=[*overrides, f"train.precision={precision}", "train.batch_size=256",
                                 "train.physical_batch_size=256", f"train.local_steps={steps}", "train.lr=0.01",
                                 "federation.rounds=1", "privacy.target_epsilon=8", "privacy.noise_seed=0",
                                 f"data.max_train_records={records}", f"data.max_test_records={max(records // 4, 50)}",
                                 "lora.dropout=0.0"])
    node = build_node(cfg, device)
    start = time.perf_counter()
    result = train_round(node.model, node.train, round_spec(cfg), unit="gpu-check",
                         ledger=Ledger(ledger_dir / f"ledger-{precision}.json"))
    _sync(device)
    seconds = time.perf_counter() - start
    ev = evaluate(node.model, node.test, "classification", 512)
    return {"precision": precision, "steps": result.steps, "train_records": len(node.train),
            "test_records": ev["num_examples"], "epsilon": result.epsilon, "accuracy": ev["accuracy"],
            "macro_f1": ev["macro_f1"], "eval_loss": ev["loss"], "train_seconds": seconds}


def junit_counts(path: Path | None) -> dict:
    """Test counts from pytest's junit XML (empty when there is none)."""
    import xml.etree.ElementTree as ET

    if path is None or not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, mps or cpu (cpu: a dry run of the path)")
    ap.add_argument("--quick", action="store_true", help="fewer steps (the figures are noisier)")
    ap.add_argument("--tiny", action="store_true", help="a tiny in-process model and synthetic records")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tests-junit", type=Path, help="gpu_check.sh: the junit XML of `pytest -m gpu`")
    ap.add_argument("--tests-rc", type=int, help="gpu_check.sh: its exit status")
    ap.add_argument("--engine-rc", type=int, help="gpu_check.sh: benchmarks/engine.py's exit status")
    args = ap.parse_args(argv)

    from fedslm.train.device import DeviceError, resolve_device

    try:
        device = resolve_device(args.device, key="--device")
    except DeviceError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    tiny = args.tiny or not _bundled_ok()
    report: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "device": device_facts(device), "quick": args.quick}
    if args.tests_junit is not None or args.tests_rc is not None:
        report["gpu_tests"] = {"exit_status": args.tests_rc, **junit_counts(args.tests_junit)}
    if args.engine_rc is not None:
        report["engine_benchmark"] = {"exit_status": args.engine_rc,
                                      "results": sorted(p.name for p in RESULTS.glob("engine*.json"))}
    with tempfile.TemporaryDirectory(prefix="fedslm-gpu-check-") as tmp:
        folder = Path(tmp)
        if tiny:
            overrides = _tiny_overrides(folder)
            report["model"] = "tiny BERT (64 wide, 2 layers) + LoRA r=8 on query,value, synthetic 3-class records"
        else:
            overrides = ["model.name=minilm", "data.source=icd10", "model.max_length=48"]
            report["model"] = "minilm (all-MiniLM-L6-v2) + LoRA r=8 on query,value + head, ICD-10 chapters"
        overrides += [f"output.dir={folder / 'run'}", "lora.r=8", "lora.alpha=16", "lora.layers=null"]
        precisions = ["fp32"] + (["bf16"] if report["device"]["bf16"] and device.type == "cuda" else [])
        steps = 6 if args.quick else 16
        report["steps"] = [step_figures(overrides, device, p, 64, steps) for p in precisions]
        for row in report["steps"]:
            print(f"{row['precision']}: DP step {row['dp_step_s'] * 1e3:.1f} ms vs non-DP {row['plain_step_s'] * 1e3:.1f} "
                  f"ms (ratio {row['dp_over_plain']:.2f}); DP {row['dp_tokens_per_s']:.0f} tokens/s; peak step "
                  f"memory DP {row['dp_peak_step_memory_mb']} MB vs non-DP {row['plain_peak_step_memory_mb']} MB")
        acc_steps, records = (10, 2000) if args.quick else (30, 8000)
        if tiny:
            acc_steps, records = min(acc_steps, 10), 480
        report["accuracy"] = [accuracy_run(overrides, device, p, acc_steps, records, folder) for p in precisions]
        for row in report["accuracy"]:
            print(f"{row['precision']}: {row['steps']} DP steps (ε={row['epsilon']:.2f}) -> accuracy "
                  f"{row['accuracy']:.4f} on {row['test_records']} held-out records ({row['train_seconds']:.1f} s)")
    report["seconds"] = time.perf_counter() - started
    day = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"gpu-{day}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
