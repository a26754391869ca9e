"""The stop rule (alpaca_qlora/stop_rule.py) checked on token ids while decoding, one step at a time.

Decoding a row's text at every step is what a stop check costs; the own loops avoid most of it by decoding only
rows that could already hold a marker.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

from alpaca_qlora.stop_rule import stop_pattern, stop_position


class StopOnMarker(StoppingCriteria):
    """For `model.generate()`: a row is done once its generated text holds a stop under the stop rule."""

    def __init__(self, tokenizer: Any, prompt_length: int, markers: Sequence[str]):
        self.tokenizer, self.prompt_length, self.markers = tokenizer, prompt_length, tuple(markers)
        for marker in self.markers:
            stop_pattern(marker)  # a blank marker fails here, before generating

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [stop_position(text, self.markers) is not None for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


_TRIGGER_CACHE: dict[tuple[int, int, str], frozenset[int]] = {}


def _trigger_ids(tokenizer: Any, chars: str) -> frozenset[int]:
    """Ids whose own text holds one of `chars` (the vocabulary is decoded once per tokenizer)."""
    key = (id(tokenizer), len(tokenizer), chars)
    if key not in _TRIGGER_CACHE:
        pieces = tokenizer.batch_decode([[index] for index in range(len(tokenizer))], skip_special_tokens=True)
        _TRIGGER_CACHE[key] = frozenset(index for index, text in enumerate(pieces) if any(c in text for c in chars))
    return _TRIGGER_CACHE[key]


class MarkerCheck:
    """The stop rule for one row's generated ids in the own loops, decoding only rows that could hold a marker.

    A stop needs the marker's first visible character ("#") in the text, and for ASCII characters that character
    comes from one token whose own text holds it (byte-level BPE and sentencepiece byte fallback alike). So a row
    is only decoded from the first such token on: exactly the decisions of decoding every row at every step."""

    def __init__(self, tokenizer: Any, markers: Sequence[str]):
        self.tokenizer, self.markers = tokenizer, tuple(markers)
        for marker in self.markers:
            stop_pattern(marker)  # a blank marker fails here, before generating
        firsts = {marker.strip()[0] for marker in self.markers}
        self.trigger_ids: frozenset[int] | None = None  # None: decode at every step
        if not self.markers:
            self.trigger_ids = frozenset()
        elif all(char.isascii() for char in firsts):
            self.trigger_ids = _trigger_ids(tokenizer, "".join(sorted(firsts)))

    def triggered_by(self, token: int) -> bool:
        return self.trigger_ids is None or token in self.trigger_ids

    def hit(self, generated: Sequence[int]) -> bool:
        if not self.markers:
            return False
        text = self.tokenizer.decode(list(generated), skip_special_tokens=True)
        return stop_position(text, self.markers) is not None
