"""Text from a causal base + adapter, streamed token by token."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from transformers import TextStreamer

from fedslm.errors import ModelError


class _Callback(TextStreamer):
    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 48, temperature: float = 0.0,
             top_p: float = 0.95, seed: Optional[int] = None,
             on_text: Optional[Callable[[str], None]] = None) -> str:
    """Greedy when ``temperature`` is 0, else nucleus sampling; ``on_text`` gets each piece as it is decoded."""
    if max_new_tokens < 1:
        raise ModelError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ModelError(f"--temperature must be >= 0, got {temperature}")
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    pieces: list[str] = []

    def collect(text: str) -> None:
        pieces.append(text)
        if on_text is not None:
            on_text(text)

    kwargs = dict(max_new_tokens=max_new_tokens, streamer=_Callback(tokenizer, collect),
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    model.generate(**inputs, **kwargs)
    return "".join(pieces)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48, batch_size: int = 16,
                   on_batch: Optional[Callable[[int], None]] = None) -> list[str]:
    """Greedy completions of many prompts, in their order. Prompts are sorted by token length and
    left-padded in batches of ``batch_size`` (a batch pads little, and left padding keeps every
    prompt's last token where generation starts); ``on_batch(count)`` follows each batch."""
    if max_new_tokens < 1:
        raise ModelError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ModelError(f"--batch-size must be >= 1, got {batch_size}")
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(
                next(model.parameters()).device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                out[i] = text
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
    return out
