"""Task formats: rows of a node's file -> examples -> token ids -> padded batches.

One :class:`Task` per model task, in a small registry. Classification maps a
text column to a label from a fixed label set; causal LM trains on
prompt/completion pairs (loss on the completion only) or on plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from fedslm.config.schema import DataConfig
from fedslm.data.examples import CausalExample, ClassificationExample, Example
from fedslm.data.readers import Row
from fedslm.errors import DataError
from fedslm.registry import Registry

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """Token ids of a split, ready for batching by index."""

    input_ids: list[list[int]]
    # Classification: one class index per record. Causal LM: one target per token (-100 = no loss).
    targets: list[Any]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)


def _text(row: Row, column: str, path: Path, *, allow_empty: bool = False) -> str:
    value = row.values.get(column, "")
    if not allow_empty and not value.strip():
        raise DataError(f"{path} line {row.line}, column '{column}': empty value")
    return value


class ClassificationTask:
    name = "classification"

    def required_columns(self, data: DataConfig, columns: Sequence[str]) -> list[str]:
        return [data.text_column, data.label_column]

    def label_set(self, rows: list[Row], data: DataConfig) -> list[str]:
        if data.labels is not None:
            return list(data.labels)
        return sorted({r.values.get(data.label_column, "").strip() for r in rows} - {""})

    def examples(self, rows: list[Row], data: DataConfig, path: Path, labels: list[str],
                 group_column: Optional[str] = None) -> list[Example]:
        index = {name: i for i, name in enumerate(labels)}
        out: list[Example] = []
        for row in rows:
            text = _text(row, data.text_column, path)
            label = _text(row, data.label_column, path).strip()
            if label not in index:
                shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
                raise DataError(
                    f"{path} line {row.line}, column '{data.label_column}': unknown label {label!r} "
                    f"(allowed: {shown}; set data.labels to the label set all nodes share)"
                )
            group = _text(row, group_column, path) if group_column else ""
            out.append(ClassificationExample(text, index[label], group))
        if len(labels) < 2:
            raise DataError(f"{path}: column '{data.label_column}' has fewer than 2 distinct labels ({labels})")
        return out

    def encode(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> Encoded:
        if not examples:
            return Encoded([], [], pad_id=pad_id(tokenizer))
        texts = [e.text for e in examples]  # type: ignore[union-attr]
        ids = truncated_ids(tokenizer, texts, max_length)
        return Encoded(ids, [e.label for e in examples], pad_id=pad_id(tokenizer))  # type: ignore[union-attr]

    def collate(self, enc: Encoded, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        input_ids, mask = _pad([enc.input_ids[i] for i in indices], enc.pad_id)
        labels = torch.tensor([enc.targets[i] for i in indices], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class CausalLMTask:
    name = "causal_lm"

    def _mode(self, data: DataConfig, columns: Sequence[str]) -> str:
        return "pairs" if data.completion_column in columns else "text"

    def required_columns(self, data: DataConfig, columns: Sequence[str]) -> list[str]:
        if self._mode(data, columns) == "pairs":
            return [data.prompt_column, data.completion_column]
        return [data.text_column]

    def label_set(self, rows: list[Row], data: DataConfig) -> None:
        return None

    def examples(self, rows: list[Row], data: DataConfig, path: Path, labels: Any,
                 group_column: Optional[str] = None) -> list[Example]:
        pairs = data.completion_column in rows[0].values
        out: list[Example] = []
        for row in rows:
            group = _text(row, group_column, path) if group_column else ""
            if pairs:
                prompt = _text(row, data.prompt_column, path, allow_empty=True)
                out.append(CausalExample(prompt, _text(row, data.completion_column, path), group))
            else:
                out.append(CausalExample("", _text(row, data.text_column, path), group))
        return out

    def encode(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> Encoded:
        if not examples:
            return Encoded([], [], pad_id=pad_id(tokenizer))
        prompts = [e.prompt for e in examples]  # type: ignore[union-attr]
        completions = [e.completion for e in examples]  # type: ignore[union-attr]
        p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        input_ids, targets = [], []
        for p, c in zip(p_ids, c_ids):
            c = list(c) + ([eos] if eos is not None else [])
            # Keep the completion (where the loss is) and as much prompt as fits, nearest first.
            c_keep = min(len(c), max(max_length - len(p), max_length // 2))
            c = c[:c_keep]
            p = list(p)[max(0, len(p) - (max_length - c_keep)):] if max_length - c_keep > 0 else []
            input_ids.append(p + c)
            targets.append([IGNORE_INDEX] * len(p) + c)
        return Encoded(input_ids, targets, pad_id=pad_id(tokenizer))

    def collate(self, enc: Encoded, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        input_ids, mask = _pad([enc.input_ids[i] for i in indices], enc.pad_id)
        labels, _ = _pad([enc.targets[i] for i in indices], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# Records checked against the tokenizer's own call before its Rust backend is trusted with the rest.
_CHECKED = 64


def truncated_ids(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """``tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]``.

    A fast tokenizer's Rust backend is asked directly: transformers 5 turns every encoding into Python
    lists through its own wrappers, 3x the time (a simulated institution's ~10,000 records: 0.7 s against
    0.25 s). The first records are tokenized both ways and the backend is only used when they agree, so a
    tokenizer whose Python side adds anything of its own keeps its own result."""
    import copy

    def reference(batch: list[str]) -> list[list[int]]:
        return [list(x) for x in tokenizer(batch, truncation=True, max_length=max_length,
                                           add_special_tokens=True)["input_ids"]]

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch") or len(texts) <= _CHECKED:
        return reference(texts)
    try:
        backend = copy.deepcopy(backend)  # the tokenizer's own keeps its settings
        backend.no_padding()
        backend.enable_truncation(max_length, strategy="longest_first",
                                  direction=getattr(tokenizer, "truncation_side", "right"))
        head = [e.ids for e in backend.encode_batch(texts[:_CHECKED], add_special_tokens=True)]
    except Exception:  # noqa: BLE001 - any backend that does not take these settings: the tokenizer's own call
        return reference(texts)
    if head != reference(texts[:_CHECKED]):
        return reference(texts)
    return head + [e.ids for e in backend.encode_batch(texts[_CHECKED:], add_special_tokens=True)]


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (never to max_length: saves compute)."""
    width = max((len(s) for s in seqs), default=1)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return out, mask


TASKS: Registry[Any] = Registry("task")


def get_task(name: str) -> Any:
    return TASKS[name]


TASKS.register(ClassificationTask.name, ClassificationTask())
TASKS.register(CausalLMTask.name, CausalLMTask())
