"""Batched greedy generation for evaluation and inference, with the prompt ids training used.

Generation stops at EOS, or at the stop rule (alpaca_qlora/stop_rule.py): once a row starts a new `### ` section
header, the model has finished its answer and begun inventing the next prompt.

Three ways to run the same greedy decoding (`generate(..., method=...)`), one module each:
- `plain`: `model.generate()` as transformers ships it; finished rows stay in the batch, fed padding.
- `fast` (greedy.py): our own loop that drops finished rows from the batch and the KV cache, calling the
  model as `generate()` does, so the tokens are the same (tested on CPU). On CUDA the evaluate stage pairs it with
  the 4-bit base dequantized once (weights.py); on CPU it decodes with a float32 copy of the float64 model, which
  hands the near ties to float64 (near_ties.py), so the tokens stay float64's.
- `graphed` (graphed.py): a static KV cache and a decoding step captured in a CUDA graph, 4-bit layers kept,
  attention through sdpa with `enable_gqa` (attention.py); under `auto`, on the base dequantized once with LoRA
  grouped by input (lora_groups.py).
Only `plain` is bitwise `generate()` on GPU: the other two run other kernels, under which near-tie logits can flip.
Where the model is sure of its answers `graphed` agrees with `plain` (measured in the README), so `auto`, the params'
default, picks `graphed` on CUDA. On CPU, where generation runs in float64 (models/numerics.py), `fast` gives plain's
tokens (tested, and checked on the whole eval set: README) and computes little for rows that have finished, so
`auto` picks it there; `plain` stays the reference when asked for. The metrics record the method that ran.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteriaList

from alpaca_qlora.data.formatting import encode_prompt
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.generation.batching import left_pad, length_sorted_batches, split_generated
from alpaca_qlora.generation.graphed import graphed_generate
from alpaca_qlora.generation.greedy import forward_model, greedy_generate, greedy_loop_blockers
from alpaca_qlora.generation.lora_groups import group_lora_for_generation
from alpaca_qlora.generation.near_ties import Float32TooCoarse, NearTieCheck
from alpaca_qlora.generation.recording import NO_RECORDING, Recorder
from alpaca_qlora.generation.stop_checks import MarkerCheck, StopOnMarker
from alpaca_qlora.generation.weights import (
    dequantize_for_generation,
    describe_weights,
    fold_lora_for_generation,
    merge_lora_for_generation,
    prepare_for_generation,
)

__all__ = ["GENERATION_CHOICES", "GENERATION_METHODS", "Generation", "Recorder", "dequantize_for_generation",
           "describe_weights", "fold_lora_for_generation", "generate", "group_lora_for_generation",
           "merge_lora_for_generation", "prepare_for_generation", "resolve_generation_method"]

log = logging.getLogger(__name__)

GENERATION_METHODS = ("plain", "fast", "graphed")
GENERATION_CHOICES = ("auto", *GENERATION_METHODS)


@dataclass(frozen=True)
class Generation:
    raw: str
    stopped_by_eos: bool
    new_tokens: int


def resolve_generation_method(requested: str, device: str | torch.device = "cpu", model: Any = None) -> str:
    """The method that runs: `auto` is graphed on CUDA and fast elsewhere (the fastest on each, and on CPU plain's
    exact tokens), and plain where the model's generation config asks for logits processors our loops do not
    apply; an explicit fast or graphed is refused there."""
    if requested not in GENERATION_CHOICES:
        raise PipelineError(f"generation method {requested!r}: use one of {', '.join(GENERATION_CHOICES)}.")
    if requested == "plain":
        return "plain"
    blockers = greedy_loop_blockers(model) if model is not None else []
    if blockers and requested == "auto":
        return "plain"
    if blockers:
        raise PipelineError(f"the {requested} generation loop applies no logits processors, but the model's "
                            f"generation config sets {', '.join(blockers)}; use generation 'plain'.")
    window = sliding_window(model) if requested == "auto" and torch.device(device).type == "cuda" else None
    if window is not None:
        log.info("generation auto: the model attends within a %d-token sliding window, which graphed's static "
                 "cache does not apply; running fast (its cache keeps the window)", window)
        return "fast"
    if requested == "auto":
        return "graphed" if torch.device(device).type == "cuda" else "fast"
    return requested


def sliding_window(model: Any) -> int | None:
    """The model's attention window (Gemma 2 and 3, Mistral v0.1), None where every layer sees every position it
    can hold (Phi-3.5's window is longer than its context)."""
    config = getattr(forward_model(model), "config", None) if model is not None else None
    window = getattr(config, "sliding_window", None)
    context = getattr(config, "max_position_embeddings", None)
    return None if window is None or (context is not None and window >= context) else window


def _plain_generate(model: Any, tokenizer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    max_new_tokens: int, stop_markers: Sequence[str]) -> list[list[int]]:
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
    return output[:, input_ids.shape[1] :].tolist()


def _run_own_loop(own_loop: Callable[..., list[list[int]]], model: Any, float32_copy: Any,
                  tie_check: NearTieCheck | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  **settings: Any) -> list[list[int]]:
    """Our loop on the float32 copy, float64 deciding the near ties, while the check has not dropped the copy; else
    on `model`. A copy found too coarse is dropped and the batch is answered again in float64."""
    if tie_check is not None and not tie_check.dropped:
        try:
            return own_loop(float32_copy, input_ids, attention_mask, tie_check=tie_check, **settings)
        except Float32TooCoarse as error:
            log.warning("%s: answering in float64 alone from here", error)
            tie_check.dropped = True
    return own_loop(model, input_ids, attention_mask, **settings)


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
    method: str = "plain",
    recorder: Recorder = NO_RECORDING,
    float32_copy: Any = None,
) -> tuple[list[Generation], dict[str, Any]]:
    """Greedy answers in the prompts' order, and throughput figures for the whole run.

    `method`: plain (model.generate), fast (greedy_generate, dropping finished rows), graphed (graphed_generate:
    static cache, CUDA graph) or auto (see resolve_generation_method). All decode greedily with the same stops.
    `recorder` is told where each batch's decoding phases end (our own loops; `plain` is transformers').
    `float32_copy` (CPU, a float64 `model`: models/numerics.float32_copy) decodes for `fast`, with the float64
    model deciding the near ties (near_ties.py), until its error on this machine is found too large."""
    device = next(model.parameters()).device
    method = resolve_generation_method(method, device, model)
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    results: list[Generation | None] = [None] * len(prompts)
    new_token_total, started = 0, time.perf_counter()
    batches = length_sorted_batches([len(ids) for ids in encoded], batch_size)
    marker_check = MarkerCheck(tokenizer, stop_markers) if method != "plain" else None
    own_loop = {"fast": greedy_generate, "graphed": graphed_generate}.get(method)
    tie_check = NearTieCheck(forward_model(model)) if method == "fast" and float32_copy is not None else None
    model.eval()
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        input_ids, attention_mask = left_pad([encoded[index] for index in batch], tokenizer.pad_token_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if own_loop is None:
            rows_new_ids = _plain_generate(model, tokenizer, input_ids, attention_mask,
                                           max_new_tokens=max_new_tokens, stop_markers=stop_markers)
        else:
            rows_new_ids = _run_own_loop(
                own_loop, model, float32_copy, tie_check, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id, marker_check=marker_check, recorder=recorder)
        for row, index in enumerate(batch):
            new_ids, stopped = split_generated(rows_new_ids[row], tokenizer.eos_token_id, tokenizer.pad_token_id)
            new_token_total += len(new_ids) + int(stopped)
            raw = tokenizer.decode(new_ids, skip_special_tokens=True)
            results[index] = Generation(raw=raw, stopped_by_eos=stopped, new_tokens=len(new_ids))
    elapsed = time.perf_counter() - started
    stats = {"generation": method, "generation_s": round(elapsed, 2), "new_tokens": new_token_total,
             "new_tokens_per_s": round(new_token_total / max(elapsed, 1e-9), 2),
             **(tie_check.stats() if tie_check is not None else {})}
    return [result for result in results if result is not None], stats
