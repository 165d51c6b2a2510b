"""Assemble what one node trains: its data, the frozen base, LoRA, token ids."""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftModel

from fedslm.config.schema import Config
from fedslm.data import TaskData, load_task_data
from fedslm.data.tasks import Encoded, get_task
from fedslm.lora import wrap
from fedslm.models import BaseModel, load_base


@dataclass
class Node:
    data: TaskData
    base: BaseModel
    model: PeftModel
    train: Encoded
    test: Encoded


def build_node(cfg: Config) -> Node:
    data = load_task_data(cfg.data, cfg.model.task)
    num_labels = len(data.labels) if data.labels is not None else None
    base = load_base(cfg.model, num_labels)
    task = get_task(cfg.model.task)
    train = task.encode(data.train, base.tokenizer, cfg.model.max_length)
    test = task.encode(data.test, base.tokenizer, cfg.model.max_length)
    model = wrap(base.model, cfg.lora, cfg.model.task, base.target_modules, seed=cfg.train.seed)
    return Node(data, base, model, train, test)
