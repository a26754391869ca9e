"""Batched greedy generation for evaluation and inference, with the prompt ids training used.

Rows are sorted by prompt length so each batch pads little; padding is on the left so every row's next token
comes right after its prompt. Generation stops at EOS, or once a row starts a new `### ` section header (the
model has finished its answer and begun inventing the next prompt).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from alpaca_qlora.formatting import encode_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    raw: str
    stopped_by_eos: bool
    new_tokens: int


class StopOnMarker(StoppingCriteria):
    """Per-row stop once the generated text contains a stop marker at the start of a line."""

    def __init__(self, tokenizer: Any, prompt_length: int, markers: Sequence[str]):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length
        self.line_markers = tuple("\n" + marker.rstrip() for marker in markers)
        self.start_markers = tuple(marker.rstrip() for marker in markers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length :]
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        done = [text.lstrip().startswith(self.start_markers) or any(m in text for m in self.line_markers)
                for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids) :] = 1
    return input_ids, attention_mask


def split_generated(new_ids: Sequence[int], eos_token_id: int, pad_token_id: int) -> tuple[list[int], bool]:
    """The tokens a row really generated (up to EOS) and whether EOS ended it."""
    ids = list(new_ids)
    if eos_token_id in ids:
        return ids[: ids.index(eos_token_id)], True
    while ids and ids[-1] == pad_token_id:  # rows stopped by a marker are padded to the batch's length
        ids.pop()
    return ids, False


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop_markers: Sequence[str],
    progress: bool = True,
) -> tuple[list[Generation], dict[str, float]]:
    """Greedy answers in the prompts' order, and throughput figures for the whole run."""
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda index: (-len(encoded[index]), index))
    results: list[Generation | None] = [None] * len(prompts)
    new_token_total, started = 0, time.perf_counter()
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    model.eval()
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        input_ids, attention_mask = left_pad([encoded[index] for index in batch], tokenizer.pad_token_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([StopOnMarker(tokenizer, input_ids.shape[1], stop_markers)]),
        )
        for row, index in enumerate(batch):
            new_ids, stopped = split_generated(output[row, input_ids.shape[1] :].tolist(), tokenizer.eos_token_id,
                                               tokenizer.pad_token_id)
            new_token_total += len(new_ids) + int(stopped)
            raw = tokenizer.decode(new_ids, skip_special_tokens=True)
            results[index] = Generation(raw=raw, stopped_by_eos=stopped, new_tokens=len(new_ids))
    elapsed = time.perf_counter() - started
    stats = {"generation_s": round(elapsed, 2), "new_tokens": new_token_total,
             "new_tokens_per_s": round(new_token_total / max(elapsed, 1e-9), 2)}
    return [result for result in results if result is not None], stats
