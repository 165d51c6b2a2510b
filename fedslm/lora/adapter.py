"""PEFT LoRA around a frozen base, and the adapter state that crosses the wire.

The adapter state is exactly the trainable tensors (LoRA A/B and, for a
classifier, the task head), keyed as PEFT keys them on disk, so the same dict
is the Flower payload and the content of ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from fedslm.config.schema import LoraConfig
from fedslm.errors import ConfigError, ModelError

_HEAD_NAMES = ("classifier", "score")
_PEFT_TASK = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def head_module_names(model: nn.Module, task: str) -> list[str]:
    if task != "classification":
        return []
    heads = [name for name, _ in model.named_children() if name in _HEAD_NAMES]
    if not heads:
        raise ConfigError(f"model.task 'classification': found no classifier head ({', '.join(_HEAD_NAMES)}) to train")
    return heads


def wrap(base: nn.Module, cfg: LoraConfig, task: str, default_targets: tuple[str, ...], seed: int,
         device: Optional[torch.device] = None) -> PeftModel:
    """Add LoRA to ``base`` (frozen); only LoRA and the task head are trainable. ``device``: where the
    model trains; the base moves there before PEFT wraps it (fedslm.train.device.place)."""
    targets = list(cfg.target_modules) if cfg.target_modules else list(default_targets)
    if not targets:
        raise ConfigError("lora.target_modules must be set for this architecture (e.g. [q_proj, v_proj])")
    full = [n for n, _ in base.named_modules()]
    names = {n.rsplit(".", 1)[-1] for n in full}
    # PEFT matches a target as a module's name or as the end of its dotted path ("pooler.dense").
    unknown = [t for t in targets if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in full)]
    if unknown:
        sample = ", ".join(sorted(n for n in names if n and not n.isdigit())[:12])
        raise ConfigError(f"lora.target_modules: no module named {', '.join(unknown)} in this model (e.g. {sample})")
    layers: dict[str, Any] = {}
    if cfg.layers is not None:
        if task == "causal_lm":  # the decoder's blocks are model.layers.N (fedslm.train.causal_prefix)
            from fedslm.train.causal_prefix import num_layers
            pattern, what = "layers", "decoder layers (a causal LM trains 1 or more)"
        else:
            from fedslm.train.prefix import num_layers
            pattern, what = "layer", "encoder layers (0 = the head alone)"

        total = num_layers(base)
        if cfg.layers > total or (task == "causal_lm" and cfg.layers < 1):
            raise ConfigError(f"lora.layers={cfg.layers}: this model has {total} {what}")
        # PEFT needs one adapted module: with 0 layers the top layer's LoRA stays B = 0 and frozen (so
        # exactly the base), and only the head is trained and sent.
        layers = {"layers_to_transform": list(range(total - max(cfg.layers, 1), total)), "layers_pattern": pattern}
    peft_cfg = PeftLoraConfig(
        **layers,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets if targets != ["all-linear"] else "all-linear",
        modules_to_save=head_module_names(base, task) or None,
        bias="none",
        task_type=_PEFT_TASK[task],
    )
    from fedslm.train.device import place

    # On its device before get_peft_model (and so before Opacus): PEFT puts each LoRA tensor on its
    # base layer's device, and a model moved after wrapping trains silently wrong (Opacus #820).
    place(base, device)
    # LoRA A is drawn from the global CPU RNG (PEFT builds it on the CPU, then moves it to the base
    # layer's device); seed it locally so the start is reproducible and the same on every device.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT still calls a transformers method renamed in v5; nothing for a user to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        model = get_peft_model(base, peft_cfg)
    if cfg.layers is not None:
        # PEFT lets an exact module path through layers_to_transform ("bert.encoder.layer.0...."): LoRA
        # below the cut would change the "frozen" prefix the cache holds. Only the top layers may adapt.
        import re

        lowest = total - max(cfg.layers, 1)
        for name, _ in model.named_parameters():
            if "lora_" in name:
                found = re.search(rf"\.{pattern}\.(\d+)\.", name)
                if found is None or int(found.group(1)) < lowest:
                    raise ConfigError(f"lora.target_modules puts LoRA on {name.split('.lora_')[0]}, outside the top "
                                      f"lora.layers={cfg.layers} layer(s) of the model")
    if cfg.ffa or cfg.layers == 0:
        for name, p in model.named_parameters():
            if ".lora_A." in name or (cfg.layers == 0 and "lora_" in name):
                p.requires_grad_(False)
    if not cfg.head_bias:
        # The final linear layer's bias, built 0 on every node and never trained: a node sends back the
        # bias it was sent (so adapters of either setting load into one model). Only the coordinator
        # can move the global copy (client-level DP noise, SecAgg's quantisation), with no record in it.
        try:
            head = trained_head(model)
        except ConfigError as exc:
            raise ConfigError(f"lora.head_bias: false: {exc}") from None
        if not isinstance(head, nn.Linear) or head.bias is None:
            raise ConfigError("lora.head_bias: false needs a classifier whose head is one linear layer with a bias "
                              "(the BERT family's); leave lora.head_bias true for this model")
        with torch.no_grad():
            head.bias.zero_()
        head.bias.requires_grad_(False)
    return model


def trained_head(model: nn.Module) -> nn.Module:
    """The classifier head's trained copy (PEFT's modules_to_save): what the adapter carries of it."""
    heads = [m.modules_to_save["default"] for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] in _HEAD_NAMES and hasattr(m, "modules_to_save")]
    if len(heads) != 1:
        raise ConfigError(f"needs one trained classifier head ({' or '.join(_HEAD_NAMES)}), this model has "
                          f"{len(heads)}")
    return heads[0]


def _frozen_lora_keys(model: PeftModel) -> set[str]:
    """PEFT state-dict keys of LoRA tensors that are frozen (FFA-LoRA's A): not part of the adapter state."""
    frozen = {n.replace(".default.", ".") for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad}
    return frozen


_INDEX = "_fedslm_adapter_index"


def _index(model: PeftModel) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(adapter, frozen LoRA) as (PEFT on-disk key, the model's parameter) pairs, in PEFT's order.

    PEFT builds its state dict by walking the whole model (several ms on a 6-layer encoder, and a round
    asks for it several times); the pairs are found once through PEFT's own function (its tensors share
    the parameters' storage) and kept on the model while its parameters are the same objects. A key whose
    tensor is not one of the model's parameters (a buffer) gives None: the callers then use PEFT's functions."""
    params = dict(model.named_parameters())
    kept = model.__dict__.get(_INDEX)
    if kept is not None and all(params.get(name) is p for name, p in kept[2]):
        return kept[0], kept[1]
    by_storage = {(p.data_ptr(), tuple(p.shape)): (name, p) for name, p in params.items()}
    frozen_keys = _frozen_lora_keys(model)
    adapter, frozen, named = [], [], []
    for key, tensor in get_peft_model_state_dict(model).items():
        hit = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
        if hit is None:
            object.__setattr__(model, _INDEX, None)
            return None  # type: ignore[return-value]
        (frozen if key in frozen_keys else adapter).append((key, hit[1]))
        named.append(hit)
    object.__setattr__(model, _INDEX, (adapter, frozen, named))
    return adapter, frozen


def frozen_digest(model: PeftModel) -> str:
    """SHA-256 of the frozen LoRA tensors (FFA-LoRA's shared A); '' when there are none."""
    import hashlib

    index = _index(model)
    if index is not None:
        frozen = {key: p.detach() for key, p in index[1]}
    else:
        keys = _frozen_lora_keys(model)
        frozen = {k: v for k, v in get_peft_model_state_dict(model).items() if k in keys}
    if not frozen:
        return ""
    h = hashlib.sha256()
    for key in sorted(frozen):
        t = frozen[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    index = _index(model)
    if index is not None:
        return {key: p.detach() for key, p in index[0]}
    frozen = _frozen_lora_keys(model)
    return {k: v for k, v in get_peft_model_state_dict(model).items() if k not in frozen}


def get_adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable adapter (and head) tensors, in PEFT's on-disk keys: on the CPU
    in fp32 whatever the model trains on (this is what is released and saved)."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in _adapter_tensors(model).items()}


def set_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors; the keys and shapes must be exactly this model's adapter."""
    expected = _adapter_tensors(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter keys do not match this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"adapter tensor {key}: shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
    if _index(model) is not None:  # the very parameters PEFT's loader would write, written in place
        with torch.no_grad():
            for key, ref in expected.items():
                ref.copy_(state[key].to(ref.dtype))
        return
    result = set_peft_model_state_dict(model, {k: v.to(expected[k].dtype) for k, v in state.items()})
    if getattr(result, "unexpected_keys", None):
        bad = [k for k in result.unexpected_keys if "lora_" in k or "modules_to_save" in k]
        if bad:
            raise ValueError(f"PEFT did not load adapter keys {bad[:3]}")


ADAPTER_META = "fedslm.json"


def save_adapter(model: PeftModel, folder: str | Path, meta: Optional[dict[str, Any]] = None) -> Path:
    """A PEFT folder (adapter_config.json + adapter_model.safetensors), plus ``fedslm.json``: the base
    model (preset name or folder), task, labels and base fingerprint, so tools can rebuild the base."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    if meta is not None:
        (folder / ADAPTER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder


def adapter_meta(cfg: Any, fingerprint: str, labels: Optional[list[str]] = None) -> dict[str, Any]:
    from fedslm.models import presets

    name = cfg.model.name if presets.get(cfg.model.name) else str(Path(cfg.model.name).expanduser().resolve())
    return {"model": name, "task": cfg.model.task, "max_length": cfg.model.max_length,
            "init_seed": cfg.model.init_seed, "pooling": cfg.model.pooling,
            "normalize": cfg.model.normalize, "labels": labels, "base_fingerprint": fingerprint,
            # The column the model read its input from, so `fedslm predict` reads the same one by default.
            "text_column": cfg.data.text_column if cfg.model.task == "classification" else cfg.data.prompt_column}


def read_adapter_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_META
    if not (Path(folder) / "adapter_config.json").is_file():
        raise ModelError(f"{folder} is not an adapter folder (no adapter_config.json)")
    if not path.is_file():
        raise ModelError(f"{folder} has no {ADAPTER_META}; it was not written by fedslm (run folder's adapter/)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_adapter(base: nn.Module, folder: str | Path) -> PeftModel:
    return PeftModel.from_pretrained(base, str(folder), is_trainable=False)
