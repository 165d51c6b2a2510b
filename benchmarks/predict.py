"""`fedslm predict` throughput: records labelled per second on this machine, by batch size.

Trains nothing: it takes a run folder's global adapter (default: the newest `make run` folder under
runs/), writes the bundled ICD-10 fixed test split (4,867 descriptions) to a CSV, labels it with
`fedslm.predict.predict_file` at each batch size, side by side in one run, and checks that every
batch size gave the same labels. The accuracy of those labels against the split's own is printed too.

    python benchmarks/predict.py [--adapter runs/icd10-hospitals-.../adapter] [--threads 2]

Writes benchmarks/results/predict.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT))

from fedslm.config.schema import DataConfig  # noqa: E402
from fedslm.data import load_task_data  # noqa: E402
from fedslm.predict import predict_file  # noqa: E402


def newest_adapter() -> Path:
    runs = sorted((ROOT / "runs").glob("*/adapter/fedslm.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no run folder with an adapter under runs/; run `make run` first or pass --adapter")
    return runs[-1].parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-sizes", default="16,64,256")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = args.adapter or newest_adapter()
    meta = json.loads((adapter / "fedslm.json").read_text())
    test = load_task_data(DataConfig(source="icd10"), "classification").test
    labels = meta["labels"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "records.csv"
        with open(source, "w", newline="", encoding="utf-8") as fh:
            table = csv.writer(fh)
            table.writerow(["text", "gold"])
            table.writerows([[r.text, labels[r.label]] for r in test])
        answers = None
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            out = Path(tmp) / f"labels-{batch}.jsonl"
            started = time.perf_counter()
            report = predict_file(adapter, source, out, batch_size=batch)
            wall = time.perf_counter() - started
            got = [json.loads(line)["label"] for line in out.read_text().splitlines()]
            if answers is None:
                answers = got
            same = got == answers
            accuracy = sum(g == labels[r.label] for g, r in zip(got, test)) / len(test)
            rows.append({"batch_size": batch, "records": report.labelled, "seconds_labelling": report.seconds,
                         "seconds_with_loading": wall, "records_per_second": report.records_per_second,
                         "same_labels_as_first": same, "accuracy": accuracy})
            print(f"batch {batch:>4}: {report.records_per_second:7.0f} records/s ({report.labelled} in "
                  f"{report.seconds:.1f} s; {wall:.1f} s with loading), accuracy {accuracy:.4f}, same labels: {same}")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"{args.threads} torch threads", "adapter": str(adapter), "base": meta["model"],
              "max_length": meta.get("max_length"), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "predict.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    lines = [f"# `fedslm predict` throughput ({result['date']}, {result['machine']})", "",
             f"Adapter `{adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter}` on base "
             f"{meta['model']} (max_length {meta.get('max_length')}), the ICD-10 fixed test split as a CSV.", "",
             "| batch size | records/s | records | seconds labelling | seconds with loading | accuracy | same labels |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch_size']} | {r['records_per_second']:.0f} | {r['records']} | {r['seconds_labelling']:.1f} | "
              f"{r['seconds_with_loading']:.1f} | {100 * r['accuracy']:.2f}% | {r['same_labels_as_first']} |" for r in rows]
    lines += ["", "Command: `python benchmarks/predict.py`."]
    (RESULTS / "predict.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0 if all(r["same_labels_as_first"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
