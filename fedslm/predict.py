"""``fedslm predict``: label every record of a CSV or JSONL file with a trained adapter.

The base is rebuilt from the adapter folder and must have the fingerprint the adapter was trained
on (:func:`fedslm.lora.merge.load_tuned`). Records are read with the same readers as training data
(a missing column or malformed line stops with the file and line); a record with an empty text is
reported with its line and skipped, and the rest are labelled. Classification: each record's label
and its probability, optionally the top k; causal LM: the greedy completion (prompts left-padded).
Inference runs in batches, records sorted by length so that a batch pads little, and the output keeps the input's order.

The text is read from the column the adapter's model was trained on (``fedslm.json``'s ``text_column``,
or for an adapter written before it named one, the run folder's ``config.yaml``); ``column`` overrides.
A causal model can be held to a closed set of answers (``choices``: constrained decoding).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO

import torch

from fedslm.errors import ConfigError, DataError
from fedslm.data.readers import read_rows

DEFAULT_COLUMN = {"classification": "text", "causal_lm": "prompt"}


@dataclass
class PredictReport:
    records: int
    labelled: int
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    seconds: float = 0.0
    output: Optional[str] = None

    @property
    def records_per_second(self) -> float:
        return self.labelled / self.seconds if self.seconds > 0 else 0.0


class _Writer:
    """Rows out as JSONL (a file or stdout) or CSV, by the output file's suffix."""

    def __init__(self, out: Optional[Path], task: str, top_k: int):
        self.task, self.top_k = task, top_k
        if out is not None and out.suffix.lower() not in (".csv", ".jsonl"):
            raise ConfigError(f"--out {out}: use a .csv or .jsonl file")
        self.csv = out is not None and out.suffix.lower() == ".csv"
        self.handle: TextIO = sys.stdout if out is None else open(out, "w", encoding="utf-8", newline="")
        self.close_handle = out is not None
        if self.csv:
            columns = ["line", "label", "probability"] if task == "classification" else ["line", "completion"]
            if task == "classification" and top_k > 1:
                columns += ["top_labels", "top_probabilities"]
            self.table = csv.writer(self.handle)
            self.table.writerow(columns)

    def write(self, row: dict[str, Any]) -> None:
        if not self.csv:
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        if self.task == "classification":
            values = [row["line"], row["label"], f"{row['probability']:.6f}"]
            if self.top_k > 1:
                values += ["|".join(label for label, _ in row["top"]), "|".join(f"{p:.6f}" for _, p in row["top"])]
        else:
            values = [row["line"], row["completion"]]
        self.table.writerow(values)

    def close(self) -> None:
        self.handle.flush()
        if self.close_handle:
            self.handle.close()


def trained_column(adapter: str | Path, meta: dict[str, Any]) -> str:
    """The column the adapter's model read its text from in training: ``fedslm.json``'s ``text_column``;
    for an adapter written before it named one, its run folder's ``config.yaml``; else the default."""
    task = meta["task"]
    column = meta.get("text_column")
    if isinstance(column, str) and column:
        return column
    config = Path(adapter).resolve().parent / "config.yaml"  # the run folder the adapter was written into
    if config.is_file():
        import yaml

        try:
            data = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            data = None
        section = data.get("data") if isinstance(data, dict) else None
        column = section.get("text_column" if task == "classification" else "prompt_column") \
            if isinstance(section, dict) else None
        if isinstance(column, str) and column:
            return column
    return DEFAULT_COLUMN[task]


def closed_set(constrained: bool, choices: Optional[str | Path]) -> Optional[list[str]]:
    """The answers of ``--constrained`` (every ICD-10-CM code, written as ``icd10-instruct`` writes it:
    ``" J20.6"``) or ``--choices FILE`` (one answer a line, exactly as the model should write it after the
    prompt, less the line end); None for free generation."""
    if constrained and choices is not None:
        raise ConfigError("--constrained (the ICD-10-CM codes) and --choices FILE both name a set of answers; give one")
    if constrained:
        from fedslm.data.bundled import icd10_codes
        from fedslm.data.codes import answer

        return [answer(code) for code in sorted(icd10_codes())]
    if choices is None:
        return None
    path = Path(choices)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--choices {path}: cannot be read as UTF-8 text ({exc.__class__.__name__})") from None
    answers = [line for line in text.splitlines() if line.strip()]
    if not answers:
        raise DataError(f"--choices {path}: no answers (one a line)")
    return answers


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


@torch.inference_mode()
def _classify(tuned: Any, texts: list[str], batch_size: int, top_k: int,
              on_batch: Callable[[int], None]) -> list[list[tuple[int, float]]]:
    """For each text, its top-k (label index, probability), in the input's order."""
    tokenizer, model = tuned.base.tokenizer, tuned.model
    device = next(model.parameters()).device
    max_length = int(tuned.meta.get("max_length", 128))
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out: list[list[tuple[int, float]]] = [[] for _ in texts]
    for chunk in _batches(order, batch_size):
        enc = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        probs = torch.softmax(model(**enc).logits.float(), dim=-1)
        values, indices = (t.cpu() for t in probs.topk(min(top_k, probs.shape[-1]), dim=-1))
        for row, i in enumerate(chunk):
            out[i] = [(int(k), float(v)) for k, v in zip(indices[row], values[row])]
        on_batch(len(chunk))
    return out


def predict_file(adapter: str | Path, input_path: str | Path, out: Optional[str | Path] = None, *,
                 column: Optional[str] = None, top_k: int = 1, batch_size: int = 64, max_new_tokens: int = 32,
                 progress: Optional[Callable[[int, int], None]] = None,
                 choices: Optional[Sequence[str]] = None, device: str = "auto") -> PredictReport:
    """Label ``input_path`` with ``adapter``; rows go to ``out`` (.csv or .jsonl) or stdout as JSONL.
    ``progress(done, total)`` is called after every batch. ``column``: the text column (default: the one
    the adapter was trained on). ``choices`` (causal LM): every completion is one of these answers.
    ``device``: auto, cpu, cuda, cuda:N or mps."""
    from fedslm.lora.merge import load_tuned
    from fedslm.train.device import resolve_device

    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    input_path = Path(input_path)
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.resolve() == input_path.resolve():
        raise ConfigError(f"--out {out_path} is the input file; choose another")
    tuned = load_tuned(adapter, resolve_device(device, key="--device"))
    task = tuned.meta["task"]
    if choices is not None and task != "causal_lm":
        raise ConfigError(f"{adapter} adapts a {task} model; a closed set of answers (--constrained, --choices) "
                          "needs a causal_lm adapter")
    trained = column is None
    column = column or trained_column(adapter, tuned.meta)
    try:
        rows = read_rows(input_path, [column])
    except DataError as exc:
        if trained and "missing column" in str(exc):
            raise DataError(f"{exc}; the adapter was trained on column {column!r} (--column reads another)") from None
        raise
    kept, skipped = [], []
    for row in rows:
        text = row.values[column]
        if not text.strip():
            skipped.append((row.line, f"column {column!r} is empty"))
        else:
            kept.append((row.line, text))
    if not kept:
        raise DataError(f"{input_path}: no record with a non-empty {column!r} to label")
    labels = tuned.meta.get("labels")
    done = 0

    def advanced(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, len(kept))

    trie = None
    if choices is not None:  # built before the output file is opened: a set it cannot write stops here
        from fedslm.models.generate import AnswerTrie

        trie = AnswerTrie(tuned.base.tokenizer, choices)
    writer = _Writer(out_path, task, top_k)
    started = time.perf_counter()
    try:
        if task == "classification":
            if not labels:
                raise DataError(f"{adapter}: the adapter folder names no labels (fedslm.json 'labels')")
            tops = _classify(tuned, [t for _, t in kept], batch_size, top_k, advanced)
            for (line, _), top in zip(kept, tops):
                row: dict[str, Any] = {"line": line, "label": labels[top[0][0]], "probability": top[0][1]}
                if top_k > 1:
                    row["top"] = [(labels[k], p) for k, p in top]
                writer.write(row)
        else:
            from fedslm.models.generate import generate_batch

            completions = generate_batch(tuned.model, tuned.base.tokenizer, [p for _, p in kept],
                                         max_new_tokens=max_new_tokens, batch_size=batch_size, on_batch=advanced,
                                         trie=trie)
            for (line, _), completion in zip(kept, completions):
                writer.write({"line": line, "completion": completion})
    finally:
        writer.close()
    return PredictReport(records=len(rows), labelled=len(kept), skipped=skipped,
                         seconds=time.perf_counter() - started, output=str(out_path) if out_path else None)
