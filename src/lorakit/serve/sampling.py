"""Choosing each sequence's next token and turning its tokens into text that is safe to stream.

    next_tokens(logits (B, V), [params], [generator])  greedy: argmax of the fp32 logits; else softmax(logits / T)
                                                       cut to the top_p nucleus, drawn with the row's own generator
    StreamText(tokenizer, stop).update(token_ids)      the new text since the last call, never any part of a stop
                                                       string and never a half-decoded character
    eos_token_ids(model, tokenizer)                    the tokens that end a sequence ("stop")

Each row is sampled on its own (its own generator, its own logits row), so one request's draws never depend on
what else is in the batch. Nucleus sampling (Holtzman et al. 2019, arXiv:1904.09751) keeps the smallest set of
most probable tokens whose probability reaches top_p.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .params import SamplingParams

REPLACEMENT = "\ufffd"  # what a tokenizer decodes a partial UTF-8 sequence to: more bytes are coming


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed`, or from the OS's entropy when None; never the global
    generator, so a request changes nobody's random state."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The token ids that end a sequence: the model's generation_config.eos_token_id (an int or a list), else
    the tokenizer's eos_token_id; empty when neither has one."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` (V,) restricted to the smallest set of most probable tokens whose total reaches top_p, renormalised
    (at least the most probable token is kept)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)  # (V,), (V,)
    before = torch.cumsum(sorted_probs, dim=0) - sorted_probs  # probability mass of the tokens ahead of each
    sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from `logits` (V,) fp32 at params.temperature > 0 with top_p, drawn with `generator`."""
    probs = torch.softmax(logits / params.temperature, dim=-1)  # (V,)
    probs = nucleus(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of every row of `logits` (B, V): argmax for greedy rows (temperature 0), a draw from its
    own generator for the others. The logits are taken in fp32 first."""
    logits = logits.float()  # (B, V)
    chosen = torch.argmax(logits, dim=-1).tolist()  # greedy for every row: one device sync
    for row, (p, generator) in enumerate(zip(params, generators)):
        if not p.greedy:
            chosen[row] = sample_row(logits[row], p, generator)
    return [int(t) for t in chosen]


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of `text` must wait: the longest suffix that is a proper prefix of a stop
    string (it may yet become that stop string)."""
    hold = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:size]):
                hold = size
                break
    return hold


class StreamText:
    """Incremental detokenisation with stop strings for one sequence.

    The new text of each token is the tail of decoding a short window (the tokens of the previous piece, then the
    new ones) minus the decoding of the window's start: the window gives the tokenizer the context it needs (a
    leading space, a merge), and the cost does not grow with the length of the sequence (vLLM's detokenizer does
    the same). A piece that ends in the replacement character (a multi-byte character cut between tokens) waits
    for the next token. What is returned also holds back a suffix that could be the start of a stop string; when
    a stop string appears the text ends right before it and `stopped` is set. `text` is everything returned so
    far (what a stream has sent); special tokens are skipped.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.decoded = ""  # the text of token_ids[:read_offset]
        self.prefix_offset = 0  # the window starts here: the tokens of the last committed piece
        self.read_offset = 0  # tokens before this are in `decoded`
        self.text = ""
        self.stopped = False

    def _decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def _pending(self, token_ids: Sequence[int]) -> str:
        """Commit the new tokens' text to `decoded` when it is whole; return what is not committed."""
        before = self._decode(token_ids[self.prefix_offset:self.read_offset])
        window = self._decode(token_ids[self.prefix_offset:])
        new = window[len(before):]
        if new and not new.endswith(REPLACEMENT):
            self.decoded += new
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
            return ""
        return new

    def _find_stop(self, full: str) -> int | None:
        """Where the first stop string starts in `full` (searched from just before what was sent), or None."""
        start = max(0, len(self.text) - self.longest_stop + 1)
        found = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def update(self, token_ids: Sequence[int], final: bool = False) -> str:
        """The new text to send after the sequence's tokens became `token_ids`; with `final` (the sequence ends
        here) nothing is held back but a stop string."""
        if self.stopped:
            return ""
        pending = self._pending(token_ids)  # first: it extends self.decoded
        full = self.decoded + pending
        cut = self._find_stop(full) if self.stop else None
        if cut is not None:
            self.stopped = True
            visible = full[:cut]
        elif final:
            visible = full
        else:
            visible = full.rstrip(REPLACEMENT)
            visible = visible[: len(visible) - held_back(visible, self.stop)]
        if len(visible) <= len(self.text):
            return ""
        piece = visible[len(self.text):]
        self.text += piece
        return piece
