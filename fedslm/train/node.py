"""Assemble what one node trains: its data, the frozen base, LoRA, token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from peft import PeftModel

from fedslm.config.schema import Config
from fedslm.data import TaskData, load_task_data
from fedslm.data.tasks import Encoded, get_task
from fedslm.lora import wrap
from fedslm.lora.prior import apply_label_prior
from fedslm.models import BaseModel, load_base
from fedslm.train.prefix import Features, split_features


@dataclass
class Node:
    data: TaskData
    base: BaseModel
    model: PeftModel
    train: Encoded
    test: Encoded
    # The frozen prefix of each split under lora.layers (fedslm.train.prefix), else None.
    train_features: Optional[Features] = None
    test_features: Optional[Features] = None


def build_node(cfg: Config, device: Optional[torch.device] = None) -> Node:
    """``device``: where the model trains and scores (None: the CPU it loads on); the base is moved
    there before LoRA is added."""
    data = load_task_data(cfg.data, cfg.model.task)
    num_labels = len(data.labels) if data.labels is not None else None
    base = load_base(cfg.model, num_labels)
    task = get_task(cfg.model.task)
    train = task.encode(data.train, base.tokenizer, cfg.model.max_length)
    test = task.encode(data.test, base.tokenizer, cfg.model.max_length)
    model = wrap(base.model, cfg.lora, cfg.model.task, base.target_modules, seed=cfg.train.seed, device=device)
    if cfg.model.head_init == "label-names" and data.labels is not None:
        apply_label_prior(model, base.tokenizer, data.labels, cfg.model)
    feats = [split_features(model, base.fingerprint, enc, cfg.model, cfg.lora.layers) for enc in (train, test)]
    return Node(data, base, model, train, test, *feats)
