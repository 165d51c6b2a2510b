"""A trained adapter back on its base: load it, merge it, and check the merge.

The base is rebuilt from the adapter folder's ``fedslm.json`` (preset name or local
folder, task, labels) and must have the fingerprint the adapter was trained on. The
merge is PEFT's ``merge_and_unload``; every merged weight is checked against
``W + scale · B · A`` computed from the adapter itself, and the saved folder is reloaded
with ``AutoModelFor*.from_pretrained`` and must give the adapter model's logits.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fedslm.config.schema import ModelConfig
from fedslm.errors import ModelError
from fedslm.lora.adapter import read_adapter_meta
from fedslm.models import BaseModel, load_base

_PEFT_PREFIX = "base_model.model."


@dataclass
class Tuned:
    model: PeftModel
    base: BaseModel
    meta: dict[str, Any]


def load_tuned(adapter_dir: str | Path, device: Optional[torch.device] = None, *,
               base: Optional[BaseModel] = None) -> Tuned:
    """Base + adapter from a fedslm adapter folder (a run folder's ``adapter/``), on ``device`` (None:
    the CPU); the base is moved there before the adapter is loaded onto it. ``base``: one already loaded
    (the adapter is added to it in place: it is used up), taken only when the adapter names its fingerprint
    and it is that one."""
    from fedslm.train.device import place

    meta = read_adapter_meta(adapter_dir)
    labels = meta.get("labels")
    if base is None:
        cfg = ModelConfig(name=meta["model"], task=meta["task"], max_length=int(meta.get("max_length", 128)),
                          init_seed=int(meta.get("init_seed", 0)), pooling=str(meta.get("pooling", "cls")),
                          normalize=bool(meta.get("normalize", False)))
        base = load_base(cfg, len(labels) if labels else None)
    elif not meta.get("base_fingerprint"):
        raise ModelError(f"{adapter_dir}: names no base fingerprint, so a base loaded elsewhere cannot be checked "
                         "against it")
    if meta.get("base_fingerprint") and base.fingerprint != meta["base_fingerprint"]:
        raise ModelError(f"{adapter_dir}: trained on base {meta['base_fingerprint'][:12]}, but {meta['model']} "
                         f"now loads as {base.fingerprint[:12]}; refusing to combine them")
    place(base.model, device)
    with warnings.catch_warnings():  # PEFT still asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(base.model, str(adapter_dir), is_trainable=False)
    model.eval()
    return Tuned(model, base, meta)


@torch.no_grad()
def expected_merged_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """For each LoRA layer (by its name in the merged model): W + scale · B · A."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            delta = module.scaling["default"] * (b @ a)
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            out[name.removeprefix(_PEFT_PREFIX)] = module.base_layer.weight.detach() + delta
    return out


def _probe(tuned: Tuned) -> dict[str, torch.Tensor]:
    text = "the of and" if tuned.meta["task"] == "classification" else "The"
    return dict(tuned.base.tokenizer(text, return_tensors="pt"))


@torch.no_grad()
def export_merged(adapter_dir: str | Path, out: str | Path, device: Optional[torch.device] = None) -> dict[str, Any]:
    """Write the merged model + tokenizer to ``out`` (HF format) and return the checks' figures; the merge
    runs on ``device`` (None: the CPU), the reload check on the CPU."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} already exists and is not empty; choose a new folder")
    if read_adapter_meta(adapter_dir).get("pooling", "cls") != "cls":
        # A plain Hugging Face classifier would read its [CLS] pooler, not the mean this head was trained on.
        raise ModelError(f"{adapter_dir} was trained with model.pooling 'mean', which a plain Hugging Face "
                         "classifier folder cannot express; use the adapter with fedslm (evaluate, or load_tuned)")
    tuned = load_tuned(adapter_dir, device)
    probe = _probe(tuned)
    where = next(tuned.model.parameters()).device
    logits_before = tuned.model(**{k: v.to(where) for k, v in probe.items()}).logits.float().cpu()
    expected = expected_merged_weights(tuned.model)
    merged = tuned.model.merge_and_unload()
    worst = 0.0
    for name, weight in expected.items():
        got = merged.get_submodule(name).weight
        err = float((got - weight).abs().max())
        if not err <= 1e-5 * max(1.0, float(weight.abs().max())):
            raise ModelError(f"merged weight {name} differs from W + scale·B·A by {err:.3g}")
        worst = max(worst, err)
    merged.save_pretrained(out)
    tuned.base.tokenizer.save_pretrained(out)
    cls = AutoModelForCausalLM if tuned.meta["task"] == "causal_lm" else AutoModelForSequenceClassification
    reloaded = cls.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    logit_err = float((reloaded(**probe).logits.float() - logits_before).abs().max())
    if not logit_err <= 1e-3:
        raise ModelError(f"the exported model's logits differ from base + adapter by {logit_err:.3g}")
    report = {"adapter": str(adapter_dir), "base": tuned.meta["model"], "task": tuned.meta["task"],
              "lora_layers": len(expected), "max_merge_error": worst, "max_logit_error": logit_err}
    (out / "fedslm-export.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
