"""The non-private ceiling's fine-tuning loop (benchmarks/recipe.py): its head starts where the row says."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("recipe_bench",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup(recipe, cls_config, what: str, head_lr):
    from fedslm.data import load_task_data
    from fedslm.data.examples import ClassificationExample
    from fedslm.data.tasks import get_task
    from fedslm.lora import wrap
    from fedslm.lora.adapter import trained_head
    from fedslm.models import load_base
    from fedslm.train import prefix

    cfg = cls_config("model.pooling=mean", "model.normalize=true", "model.head_init=label-names",
                     "model.head_prior_scale=7", "lora.head_bias=true", "lora.layers=null", "train.lr=5e-5")
    labels = load_task_data(cfg.data, "classification").labels
    base = load_base(cfg.model, len(labels))
    if what == "all":
        model, head = base.model, base.model.classifier
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = wrap(base.model, cfg.lora, "classification", base.target_modules, seed=0)
        head = trained_head(model)
    opt = recipe._head_and_optimiser(model, cfg, labels, base.tokenizer, head_lr)
    names = get_task("classification").encode([ClassificationExample(n, i) for i, n in enumerate(labels)],
                                              base.tokenizer, cfg.model.max_length)
    expected = F.normalize(prefix.compute(model, names, 0).hidden, dim=-1) * 7
    return model, head, opt, expected


@pytest.mark.parametrize("what", ["all", "lora"])
def test_the_fine_tune_head_starts_from_the_label_names_and_trains_at_its_own_lr(recipe, cls_config, what):
    model, head, opt, expected = _setup(recipe, cls_config, what, head_lr=1e-2)
    # The trained head (LoRA: PEFT's trained copy, not the frozen original) is the label-name prior, bias 0.
    assert torch.allclose(head.weight, expected, atol=1e-5)
    assert torch.count_nonzero(head.bias) == 0
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_lr[1e-2] == {id(head.weight), id(head.bias)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert by_lr[5e-5] == trainable - by_lr[1e-2] and by_lr[5e-5]


def test_without_head_lr_the_head_trains_at_train_lr(recipe, cls_config):
    _, _, opt, _ = _setup(recipe, cls_config, "all", head_lr=None)
    assert {g["lr"] for g in opt.param_groups} == {5e-5}
