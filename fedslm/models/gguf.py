"""Turn a GGUF causal LM into a plain Hugging Face folder, once, so later loads take seconds.

transformers loads GGUF files by dequantizing every tensor (tens of seconds, and the
tokenizer alone takes ~20 s), and transformers 5 cannot ``save_pretrained`` a model
loaded that way. So the model is rebuilt from its config, the dequantized weights are
loaded into it with ``load_state_dict`` (strict), and that plain model is saved with
its tokenizer. The folder appears atomically (built beside it, then renamed), under a
file lock, so concurrent first uses (several simulated institutions) build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from fedslm.errors import ModelError


def cache_root() -> Path:
    """``$FEDSLM_CACHE``, else ``$XDG_CACHE_HOME/fedslm``, else ``~/.cache/fedslm``."""
    if os.environ.get("FEDSLM_CACHE"):
        return Path(os.environ["FEDSLM_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedslm"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dequantize(gguf_file: Path, out_dir: Path) -> Path:
    """Write the GGUF model at ``gguf_file`` as a plain fp32 HF folder ``out_dir`` (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     local_files_only=True)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelError(f"{gguf_file}: dequantized weights do not fit the model built from its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    del quantized
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def cached_plain_model(name: str, make_gguf: Callable[[Path], Path], notice: Optional[str] = None) -> Path:
    """The plain folder ``<cache>/<name>``, built from the GGUF that ``make_gguf(dir)`` writes, on first use."""
    target = cache_root() / name
    if (target / "config.json").is_file():
        return target
    with _locked(cache_root() / f".{name}.lock"):
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        if notice:
            print(notice, file=sys.stderr, flush=True)
        print(f"fedslm: first use of {name}: dequantizing the GGUF once into {target} (a minute or two)",
              file=sys.stderr, flush=True)
        gguf_file = make_gguf(cache_root())
        try:
            dequantize(gguf_file, target)
        finally:
            gguf_file.unlink(missing_ok=True)
    return target
