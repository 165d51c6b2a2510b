"""Text from a causal base + adapter, streamed token by token; optionally only answers of a closed set.

Closed-set (constrained) decoding: :class:`AnswerTrie` is a prefix trie over the token ids of each
allowed answer, tokenized as a completion is in training (no special tokens), and
:class:`TrieConstraint` masks every logit but the trie's next tokens, so greedy decoding can write
only a whole answer, then an end token (EOS, or a newline where the tokenizer has one token for it).
Only the canonical tokenization of an answer is allowed: the same text split differently is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TextStreamer

from fedslm.errors import ModelError


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    end: bool = False  # a whole answer ends here (it may also continue: J20 and J20.6)


class AnswerTrie:
    """The token-id prefix trie of a closed set of answers (e.g. :func:`fedslm.data.codes.answer` of
    every valid code). ``allowed(generated)`` gives the tokens that may follow ``generated``."""

    def __init__(self, tokenizer, answers: Iterable[str]):
        answers = sorted(set(answers))
        if not answers:
            raise ModelError("constrained decoding needs at least one answer")
        if tokenizer.eos_token_id is None:
            raise ModelError("constrained decoding needs a tokenizer with an EOS token to end an answer")
        self.eos = int(tokenizer.eos_token_id)
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.ends = [self.eos] + ([int(newline[0])] if len(newline) == 1 and newline[0] != self.eos else [])
        ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
        # An answer the tokenizer can only write as <unk> (or as nothing) could never be read back.
        unk = tokenizer.unk_token_id
        bad = [a for a, seq in zip(answers, ids) if not seq or (unk is not None and unk in seq)]
        if bad:
            raise ModelError(f"constrained decoding: {len(bad)} of {len(answers)} answers cannot be written with "
                             f"this tokenizer (unknown tokens), e.g. {bad[0]!r}")
        self.root = _Node()
        self.size = len(answers)
        self.depth = 0
        for seq in ids:
            node = self.root
            for token in seq:
                node = node.children.setdefault(int(token), _Node())
            node.end = True
            self.depth = max(self.depth, len(seq))

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """The tokens that may follow ``generated``; past a finished answer (an end token written),
        only EOS."""
        node = self.root
        for token in generated:
            node = node.children.get(int(token))
            if node is None:
                return [self.eos]
        return list(node.children) + (self.ends if node.end else [])


class TrieConstraint(LogitsProcessor):
    """Every logit but the trie's allowed next tokens set to -inf. ``start``: where generation begins
    in ``input_ids`` (the padded prompt length: prompts are left-padded, so it is one for the batch)."""

    def __init__(self, trie: AnswerTrie, start: int):
        self.trie, self.start = trie, start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for row in range(input_ids.shape[0]):
            allowed = self.trie.allowed(input_ids[row, self.start:].tolist())
            mask[row, allowed] = 0.0
        return scores + mask


def _constrained(trie: Optional[AnswerTrie], start: int, max_new_tokens: int) -> dict:
    """generate() arguments for ``trie`` (none without one). A constrained answer is its tokens and an end
    token: that many new tokens, whatever was asked, so no answer is cut to a prefix that is no answer."""
    if trie is None:
        return {"max_new_tokens": max_new_tokens}
    return {"max_new_tokens": trie.depth + 1, "logits_processor": LogitsProcessorList([TrieConstraint(trie, start)])}


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
             on_text: Optional[Callable[[str], None]] = None, trie: Optional[AnswerTrie] = None) -> str:
    """Greedy when ``temperature`` is 0, else nucleus sampling; ``on_text`` gets each piece as it is decoded;
    ``trie``: only one of its answers (and an end token)."""
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

    kwargs = dict(**_constrained(trie, inputs["input_ids"].shape[1], max_new_tokens),
                  streamer=_Callback(tokenizer, collect),
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
                   on_batch: Optional[Callable[[int], None]] = None, trie: Optional[AnswerTrie] = None) -> list[str]:
    """Greedy completions of many prompts, in their order. Prompts are sorted by token length and
    left-padded in batches of ``batch_size`` (a batch pads little, and left padding keeps every
    prompt's last token where generation starts); ``on_batch(count)`` follows each batch.
    ``trie``: each completion is one of its answers (then an end token)."""
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
            ids = model.generate(**enc, **_constrained(trie, enc["input_ids"].shape[1], max_new_tokens),
                                 do_sample=False, pad_token_id=pad)
            texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                out[i] = text
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
    return out
