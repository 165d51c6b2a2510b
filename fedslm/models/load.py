"""Load the frozen base model and its tokenizer, offline, identically on every node.

A base is a bundled preset or a local Hugging Face folder; nothing is ever
fetched from a hub (``local_files_only``). A freshly initialised task head is
re-drawn from ``model.init_seed`` with its own generator, so the whole base is
bit-identical on every node for the same config; :func:`fingerprint` proves it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from fedslm.config.schema import ModelConfig
from fedslm.errors import ModelError
from fedslm.models import presets
from fedslm.models.pooling import use_mean_pooling


@dataclass
class BaseModel:
    model: nn.Module
    tokenizer: Any
    path: Path
    # Default LoRA targets when lora.target_modules is unset.
    target_modules: tuple[str, ...]
    fingerprint: str


# Attention projections by architecture, for local folders without a preset.
_ARCH_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence load reports and progress bars for this call only (no global change)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_model_path(cfg: ModelConfig) -> tuple[Path, tuple[str, ...]]:
    preset = presets.get(cfg.name)
    if preset is not None:
        if cfg.task not in preset.tasks:
            raise ModelError(
                f"model.name '{cfg.name}' supports model.task {', '.join(preset.tasks)}; got '{cfg.task}'"
            )
        return preset.locate(), preset.target_modules
    path = Path(cfg.name).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.name '{cfg.name}' is neither a bundled preset ({', '.join(presets.names())}) "
            "nor a local model folder (nothing is downloaded)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name '{cfg.name}': folder has no config.json (not a Hugging Face model folder)")
    return path, ()


def load_base(cfg: ModelConfig, num_labels: Optional[int] = None) -> BaseModel:
    """The frozen base for ``cfg.task``; classification needs ``num_labels``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path, targets = resolve_model_path(cfg)
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            if cfg.task == "classification":
                if num_labels is None or num_labels < 2:
                    raise ModelError(f"a classifier needs at least 2 labels, got {num_labels}")
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, local_files_only=True, output_loading_info=True,
                    dtype=torch.float32,
                )
            else:
                model, info = AutoModelForCausalLM.from_pretrained(
                    path, local_files_only=True, output_loading_info=True, dtype=torch.float32
                )
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.name '{cfg.name}': cannot load from {path}: {str(exc).splitlines()[0]}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    _redraw_fresh(model, sorted(info.get("missing_keys", ())), cfg.init_seed)
    if cfg.task == "classification" and cfg.classifier_dropout is not None:
        dropout = getattr(model, "dropout", None)  # what the head reads through (BERT family)
        if not isinstance(dropout, nn.Dropout):
            raise ModelError(f"model.classifier_dropout: '{model.config.model_type}' has no dropout before its "
                             "classifier head (leave model.classifier_dropout unset)")
        dropout.p = float(cfg.classifier_dropout)
    if cfg.task == "classification" and cfg.pooling == "mean":
        use_mean_pooling(model, cfg.normalize)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if not targets:
        targets = _ARCH_TARGETS.get(model.config.model_type, ())
    return BaseModel(model, tokenizer, path, targets, fingerprint(model))


@torch.no_grad()
def _redraw_fresh(model: nn.Module, missing: list[str], seed: int) -> None:
    """Re-initialise weights absent from the checkpoint (the new head) from ``seed``."""
    if not missing:
        return
    gen = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    params = dict(model.named_parameters())
    for name in missing:
        p = params.get(name)
        if p is None:
            continue
        if name.endswith("bias") or p.dim() == 1:
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over every base tensor's name, dtype, shape and bytes (LoRA excluded)."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if "lora_" in name:
            continue
        t = state[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
