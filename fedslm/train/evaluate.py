"""Evaluation of a model on a node's held-out split."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedslm.data.tasks import Encoded, get_task
from fedslm.train.device import model_device, to_device
from fedslm.train.losses import token_losses


def macro_f1(y_true: list[int], y_pred: list[int]) -> float:
    """Macro-averaged F1 over the classes present in the labels or the predictions."""
    classes = sorted(set(y_true) | set(y_pred))
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def _from_features(model: nn.Module, features: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from fedslm.train.prefix import Suffix

    return evaluation_from_features(Suffix(model, features.layers), features)


@torch.no_grad()
def evaluation_from_features(suffix: nn.Module, feats: Any, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-record losses, predictions) of ``suffix`` (fedslm.train.prefix.Suffix) on every cached record of
    ``feats`` (its Features), in eval mode."""
    was = suffix.training
    suffix.eval()
    device = next(suffix.parameters()).device
    losses, preds = [], []
    try:
        for start in range(0, len(feats), batch_size):
            b = {k: v.to(device) for k, v in feats.batch(range(start, min(start + batch_size, len(feats)))).items()}
            logits = suffix(b["hidden"], b.get("attention_mask")).float()
            losses.append(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="none").cpu())
            preds.append(logits.argmax(-1).cpu())
    finally:
        suffix.train(was)
    return torch.cat(losses) if losses else torch.zeros(0), torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def confusion(model: nn.Module, enc: Encoded, num_labels: int, batch_size: int = 128,
              features: Any = None) -> list[list[int]]:
    """Classification: counts[gold][predicted] over ``enc`` (from its cached prefix when ``features``)."""
    if features is not None:
        _, preds = _from_features(model, features)
        golds = features.labels.tolist()
        preds_list = preds.tolist()
    else:
        task = get_task("classification")
        device = model_device(model)
        was_training = model.training
        model.eval()
        preds_list, golds = [], []
        try:
            for start in range(0, len(enc), batch_size):
                batch = to_device(task.collate(enc, range(start, min(start + batch_size, len(enc)))), device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                preds_list += logits.argmax(-1).tolist()
                golds += batch["labels"].tolist()
        finally:
            model.train(was_training)
    counts = [[0] * num_labels for _ in range(num_labels)]
    for g, p in zip(golds, preds_list):
        counts[int(g)][int(p)] += 1
    return counts


@torch.no_grad()
def evaluate(model: nn.Module, enc: Encoded, task_name: str, batch_size: int = 128,
             features: Any = None) -> dict[str, Any]:
    """Classification: loss, accuracy, macro-F1. Causal LM: token loss and perplexity.
    ``features``: ``enc``'s cached frozen prefix (fedslm.train.prefix): scored from there."""
    if getattr(features, "causal", False):  # fedslm.train.causal_prefix
        from fedslm.train.causal_prefix import evaluation_from_features

        sums, counts = evaluation_from_features(model, features)
        loss = float(sums.sum()) / max(int(counts.sum()), 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(counts.sum()),
                "num_examples": len(features)}
    if features is not None:
        losses, preds = _from_features(model, features)
        golds = features.labels.tolist()
        n = max(len(golds), 1)
        return {"loss": float(losses.sum()) / n,
                "accuracy": sum(int(p == g) for p, g in zip(preds.tolist(), golds)) / n,
                "macro_f1": macro_f1(golds, preds.tolist()), "num_examples": len(golds)}
    task = get_task(task_name)
    device = model_device(model)  # scored where the model is
    was_training = model.training
    model.eval()
    try:
        if task_name == "classification":
            loss_sum, preds, golds = 0.0, [], []
            for start in range(0, len(enc), batch_size):
                batch = to_device(task.collate(enc, range(start, min(start + batch_size, len(enc)))), device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
                preds += logits.argmax(-1).tolist()
                golds += batch["labels"].tolist()
            n = max(len(golds), 1)
            return {
                "loss": loss_sum / n,
                "accuracy": sum(int(p == g) for p, g in zip(preds, golds)) / n,
                "macro_f1": macro_f1(golds, preds),
                "num_examples": len(golds),
            }
        nll_sum, tokens = 0.0, 0
        for start in range(0, len(enc), batch_size):
            batch = to_device(task.collate(enc, range(start, min(start + batch_size, len(enc)))), device)
            nll, mask = token_losses(model, batch)
            nll_sum += float((nll * mask).sum())
            tokens += int(mask.sum())
        loss = nll_sum / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "num_examples": len(enc)}
    finally:
        model.train(was_training)




@torch.no_grad()
def evaluation_counts(model: nn.Module, enc: Encoded, task_name: str, batch_size: int = 128,
                      loss_cap: float = 10.0, features: Any = None) -> dict[str, float]:
    """Per-record sums whose sensitivity to one record is bounded, for a DP release: the number of
    records, how many were classified right (classification), and the sum of each record's loss
    clipped to [0, loss_cap] (a causal LM record's loss is the mean over its own completion tokens)."""
    if getattr(features, "causal", False):  # fedslm.train.causal_prefix
        from fedslm.train.causal_prefix import evaluation_from_features

        sums, counts = evaluation_from_features(model, features)
        per_record = sums / counts.clamp(min=1)
        return {"records": len(features), "correct": 0,
                "loss_sum": float(torch.nan_to_num(per_record, nan=loss_cap, posinf=loss_cap).clamp(0.0, loss_cap).sum())}
    if features is not None:
        losses, preds = _from_features(model, features)
        return {"records": len(features), "correct": int((preds == features.labels).sum()),
                "loss_sum": float(torch.nan_to_num(losses, nan=loss_cap, posinf=loss_cap).clamp(0.0, loss_cap).sum())}
    task = get_task(task_name)
    device = model_device(model)  # scored where the model is
    was_training = model.training
    model.eval()
    records, correct, loss_sum = 0, 0, 0.0
    try:
        for start in range(0, len(enc), batch_size):
            batch = to_device(task.collate(enc, range(start, min(start + batch_size, len(enc)))), device)
            if task_name == "classification":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                per_record = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
            else:
                nll, mask = token_losses(model, batch)
                per_record = (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            # A NaN or inf loss counts as the cap: each record's share stays within [0, loss_cap].
            loss_sum += float(torch.nan_to_num(per_record, nan=loss_cap, posinf=loss_cap).clamp(0.0, loss_cap).sum())
            records += int(per_record.numel())
    finally:
        model.train(was_training)
    return {"records": records, "correct": correct, "loss_sum": loss_sum}
