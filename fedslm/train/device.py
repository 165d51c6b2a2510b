"""Where a node trains and scores, and in which arithmetic.

The node decides its hardware: a deployed node reads ``resources.device`` from its policy, ``fedslm
train/predict/generate/export`` take ``--device``, and a simulated institution uses ``cuda`` when
``federation.client_gpus`` > 0 (Ray then shows each actor its share of a GPU as ``cuda:0``), else the
CPU. A coordinator's request never names a device.

Mixed precision (``train.precision``) is for the forward and backward passes only. Whatever the
guarantee rests on stays fp32: the trainable LoRA/head tensors are fp32 master weights, each record's
gradient is cast to fp32 before its norm is taken and it is clipped, and the noise is drawn in fp32
(:mod:`fedslm.privacy.dpsgd`). fp16 runs with a fixed loss scale (never a dynamic one: a scale that
backs off when some record overflows would make every record's contribution depend on the others,
and the sensitivity bound C would no longer hold); an overflowing record's gradient is zeroed, which
is within the bound.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Mapping, Optional

import torch
from torch import nn

from fedslm.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16's fixed loss scale: large enough that typical per-record gradients of a small LM do not underflow
# fp16's 6e-8 floor, small enough that they do not overflow its 65504 ceiling.
FP16_LOSS_SCALE = 2.0**10


class DeviceError(ConfigError):
    """A device or precision this machine cannot provide; the message names the key and what torch sees."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def torch_sees() -> str:
    """What accelerators torch sees here, in words (for one-line refusals and ``node check``)."""
    build = f"torch {torch.__version__}"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = ", ".join(f"cuda:{i}" for i in range(count))
        cuda = f"{count} CUDA device{'s' if count != 1 else ''} ({names})"
    else:
        cuda = f"no CUDA device ({build}{' build' if '+cpu' in torch.__version__ else ''})"
    return cuda + ("; MPS available" if _mps_available() else "")


def resolve_device(spec: str, key: str = "resources.device") -> torch.device:
    """``auto | cpu | cuda | cuda:N | mps`` as a torch.device this machine has; ``auto``: CUDA if torch
    sees it, else MPS, else the CPU. Anything else is refused naming ``key``."""
    value = str(spec).strip().lower()
    if value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "mps":
        if not _mps_available():
            raise DeviceError(f"{key}: mps is not available: torch sees {torch_sees()}")
        return torch.device("mps")
    if value == "cuda" or value.startswith("cuda:"):
        index = 0
        if value != "cuda":
            tail = value.split(":", 1)[1]
            if not tail.isdigit():
                raise DeviceError(f"{key} must be one of {', '.join(DEVICES)}, got {spec!r}")
            index = int(tail)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise DeviceError(f"{key}: {value} is not available: torch sees {torch_sees()}")
        return torch.device("cuda", index)
    raise DeviceError(f"{key} must be one of {', '.join(DEVICES)}, got {spec!r}")


def simulation_device(client_gpus: float) -> str:
    """A simulated institution's device: its share of a GPU when federation.client_gpus > 0, else the CPU
    (so that N institutions on one machine do not all pile onto one GPU unasked)."""
    return "cuda" if client_gpus > 0 else "cpu"


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu"  # torch's CPU autocast runs bf16 (fast only with AMX/AVX512-BF16)


def feature_precision(value: str, device: torch.device) -> str:
    """model.feature_precision for ``device``: ``fp32``, or ``bf16`` for ``auto`` where bf16 is native there."""
    if str(value).strip().lower() != "auto":
        return "fp32"
    if device.type == "cuda":
        return "bf16" if bf16_supported(device) else "fp32"
    from fedslm import cpu

    return "bf16" if device.type == "cpu" and cpu.has_native_bf16() else "fp32"


def resolve_precision(precision: str, device: torch.device, key: str = "train.precision") -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device``; ``auto``: bf16 on a CUDA device that supports it,
    else fp32 (the CPU and MPS: bf16 there is rarely faster)."""
    value = str(precision).strip().lower()
    if value not in PRECISIONS:
        raise DeviceError(f"{key} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if value == "auto":
        return "bf16" if device.type == "cuda" and bf16_supported(device) else "fp32"
    if value == "bf16" and not bf16_supported(device):
        raise DeviceError(f"{key}: bf16 is not supported on {device} (torch sees {torch_sees()}); use fp32"
                          + (" or fp16" if device.type == "cuda" else ""))
    if value == "fp16" and device.type != "cuda":
        raise DeviceError(f"{key}: fp16 runs on CUDA only (its fixed loss scale is tuned for GPU kernels); on "
                          f"{device} use fp32 or bf16")
    return value


def autocast(device: torch.device, precision: str) -> ContextManager[Any]:
    """The forward pass's autocast for a resolved precision (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def loss_scale(precision: str) -> float:
    """The fixed factor the loss is multiplied by before backward (and gradients divided by, in fp32)."""
    return FP16_LOSS_SCALE if precision == "fp16" else 1.0


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: Optional[torch.device]) -> dict[str, Any]:
    """``batch`` with its tensors on ``device`` (None: as they are)."""
    if device is None:
        return dict(batch)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def place(model: nn.Module, device: Optional[torch.device]) -> nn.Module:
    """Move ``model`` to ``device``. Called on the frozen base *before* PEFT adds LoRA and before Opacus
    wraps it: moving a wrapped model afterwards silently corrupts LoRA updates (Opacus #820)."""
    if device is not None:
        model.to(device)
    return model
