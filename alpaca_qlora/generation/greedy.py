"""Our greedy loop (generation `fast`): generate()'s decoding, with finished rows dropped from the batch and from the
KV cache, so the late steps run on the rows still going, and the prefill run on chunks of rows of similar length, so
a large batch pays no padding for its longest prompt.

Everything that makes its tokens generate()'s lives here and the graphed loop reuses it: how the model is called
(the transformers model under PEFT, position ids from the mask, the mask dropped when nothing is padded, the last
position's logits only, argmax in fp32), when a row is finished (EOS, the limit, the stop rule) and the generation
settings under which no own loop can match generate() (logits processors it would apply).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from alpaca_qlora.generation.batching import left_pad, unpadded
from alpaca_qlora.generation.kv_cache import is_preallocated, preallocated_cache, stacked_cache
from alpaca_qlora.generation.recording import NO_RECORDING, Recorder
from alpaca_qlora.generation.stop_checks import MarkerCheck

if TYPE_CHECKING:
    from alpaca_qlora.generation.near_ties import NearTieCheck

# The prefill runs on chunks of this many rows, each cut to its own longest prompt: a batch sorted by length then
# pays almost no padding in its prefill, however many rows decode together afterwards.
PREFILL_ROWS = 16

# Finished rows leave the batch once they are this share of it (1/8; in a batch of under 16 rows, each at once):
# leaving copies every layer's filled cache, so the rows still running wait until enough of them pay for that copy.
DROP_FINISHED_SHARE = 8

# Generation-config settings that add logits processors or stopping rules to greedy `generate()`; our own loop
# applies none of them, so it refuses a model whose generation config sets any (the plain path still works).
_PROCESSOR_SETTINGS = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False), "stop_strings": (None,), "max_time": (None,), "token_healing": (None, False),
}


def greedy_loop_blockers(model: Any) -> list[str]:
    """Generation-config settings under which `greedy_generate` would not reproduce greedy `generate()`."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    return [f"{name}={getattr(config, name)!r}" for name, allowed in _PROCESSOR_SETTINGS.items()
            if getattr(config, name, None) not in allowed]


def take_token(generated: list[int], token: int, *, watched: bool, eos_token_id: int, max_new_tokens: int,
               marker_check: MarkerCheck | None) -> tuple[bool, bool]:
    """Append one greedy token to a row; returns (row finished, row watched). A row is watched once it generated a
    token that may start a stop marker; only watched rows are decoded to look for one."""
    generated.append(token)
    done = token == eos_token_id or len(generated) >= max_new_tokens
    if not done and marker_check is not None:
        watched = watched or marker_check.triggered_by(token)
        done = watched and marker_check.hit(generated)
    return done, watched


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's next token as greedy `generate()` picks it: argmax of the last position's logits in fp32."""
    return logits[:, -1].to(dtype=torch.float32).argmax(dim=-1)


def prefill_inputs(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids of a left-padded batch, and the mask as `generate()` passes it (none when nothing is padded)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    return position_ids, (attention_mask if not bool(attention_mask.all()) else None)


def forward_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected): what `generate()` itself calls."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def forward_last(network: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any = None) -> Any:
    """The model's outputs (last position's logits only) for a left-padded batch, as `generate()` calls it first,
    filling `cache` where one is given."""
    position_ids, mask = prefill_inputs(attention_mask)
    return network(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                   use_cache=cache is not None, logits_to_keep=1, return_dict=True)


@torch.inference_mode()
def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    marker_check: MarkerCheck | None = None,
    recorder: Recorder = NO_RECORDING,
    tie_check: NearTieCheck | None = None,
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch, dropping finished rows from the batch and the KV cache.

    Returns each row's new ids, ending with EOS when EOS stopped it. Calls the model as transformers 5's greedy
    `generate()` does (its DynamicCache's keys and values, here written in place: kv_cache.py; position ids from
    the mask, mask dropped when there is no padding, logits of the last position only, argmax of fp32 logits), so
    rows get the tokens `generate()` gives them. With `tie_check`, `model` is a float32 copy of the check's float64
    model, which decides the near ties (near_ties.py).
    """
    recorder.begin()
    network = forward_model(model)
    device = input_ids.device
    prompts = unpadded(input_ids, attention_mask) if tie_check is not None else []
    logits, cache, attention_mask = prefill(network, input_ids, attention_mask,
                                            capacity=input_ids.shape[1] + max_new_tokens)
    position_ids, mask = prefill_inputs(attention_mask)
    rows = list(range(input_ids.shape[0]))  # original row index of each batch position
    padded = [not bool(attention_mask[row].all()) for row in rows]
    generated: list[list[int]] = [[] for _ in rows]
    watched = [False] * len(rows)  # a row that generated a marker's first character: decode it every step
    finished = [False] * len(rows)
    step_positions = position_ids
    for step in range(max_new_tokens):
        next_tokens = greedy_tokens(logits)
        if tie_check is not None:
            def sequence_of(position: int, rows: list[int] = rows) -> list[int]:
                return prompts[rows[position]].tolist() + generated[rows[position]]

            next_tokens = tie_check.decide(
                logits, next_tokens, sequence_of, [position for position, row in enumerate(rows) if not finished[row]],
                sampled=[0] if step == 0 else [])
        tokens = next_tokens.tolist()
        if step == 0:
            recorder.mark("prefill")
        keep = _running_positions(rows, tokens, generated, watched, finished, eos_token_id=eos_token_id,
                                  max_new_tokens=max_new_tokens, marker_check=marker_check)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(rows) - len(keep) >= max(1, len(rows) // DROP_FINISHED_SHARE):
            if mask is not None:
                keep = _with_a_padded_row(keep, rows, padded)
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            rows = [rows[position] for position in keep]
            next_tokens, step_positions = next_tokens[index], step_positions[index]
            mask = mask[index] if mask is not None else None
        step_positions = step_positions[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        outputs = network(input_ids=next_tokens[:, None], attention_mask=mask, position_ids=step_positions,
                          past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True)
        logits, cache = outputs.logits, outputs.past_key_values
        del outputs
    recorder.mark("decode")
    return generated


def prefill(network: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
            capacity: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """The prompts' last logits, a KV cache of `capacity` positions holding them, and the mask of what it holds.

    A batch of more than PREFILL_ROWS rows runs in chunks of consecutive rows (a length-sorted batch: rows of similar
    length). A chunk's prompts share their first tokens (the template's preamble), which run once for the chunk; then
    each row's own tokens, left-padded to the chunk's longest. The cache holds a row's shared tokens, its padding
    (zero, masked) and its own tokens, ending at the batch's last column, and the mask says so; positions count
    only the row's tokens, as they do in the whole batch. Caches whose layers are not all preallocated run whole."""
    cache = preallocated_cache(network.config, capacity)
    if input_ids.shape[0] <= PREFILL_ROWS or not is_preallocated(cache):
        outputs = forward_last(network, input_ids, attention_mask, cache)
        return outputs.logits, outputs.past_key_values, attention_mask
    width = input_ids.shape[1]
    prompts = unpadded(input_ids, attention_mask)
    logits, parts, held = [], [], torch.zeros_like(attention_mask)
    for start in range(0, len(prompts), PREFILL_ROWS):
        chunk_logits, part, chunk_mask = _prefill_chunk(network, prompts[start : start + PREFILL_ROWS])
        logits.append(chunk_logits)
        parts.append(part)
        held[start : start + PREFILL_ROWS, width - chunk_mask.shape[1] :] = chunk_mask
    return torch.cat(logits), stacked_cache(network.config, capacity, width, parts), held


def _prefill_chunk(network: Any, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """A chunk's last logits, its cache (shared tokens once, then each row's own) and the mask of that cache."""
    shared = _shared_prefix(prompts)
    own_ids, own_mask = left_pad([prompt[shared:].tolist() for prompt in prompts], pad_token_id=0)  # 0: masked
    own_ids, own_mask = own_ids.to(prompts[0].device), own_mask.to(prompts[0].device)
    mask = torch.cat([own_mask.new_ones((len(prompts), shared)), own_mask], dim=1)
    if shared:
        prefix = preallocated_cache(network.config, shared)
        network(input_ids=prompts[0][None, :shared], position_ids=torch.arange(shared, device=mask.device)[None],
                past_key_values=prefix, use_cache=True, logits_to_keep=1, return_dict=True)
        cache = stacked_cache(network.config, mask.shape[1], shared, [prefix] * len(prompts))
    else:
        cache = preallocated_cache(network.config, mask.shape[1])
    position_ids, step_mask = prefill_inputs(mask)
    outputs = network(input_ids=own_ids, attention_mask=step_mask, position_ids=position_ids[:, shared:],
                      past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True)
    return outputs.logits, outputs.past_key_values, mask


def _shared_prefix(prompts: list[torch.Tensor]) -> int:
    """How many first tokens every prompt has in common, each keeping at least one of its own (its last logits)."""
    shortest = min(len(prompt) for prompt in prompts)
    heads = torch.stack([prompt[: shortest - 1] for prompt in prompts])
    return int((heads == heads[0]).all(dim=0).long().cumprod(dim=0).sum())


def _running_positions(rows: list[int], tokens: list[int], generated: list[list[int]], watched: list[bool],
                       finished: list[bool], *, eos_token_id: int, max_new_tokens: int,
                       marker_check: MarkerCheck | None) -> list[int]:
    """Each unfinished row takes its token (take_token's rule); the batch positions of the rows still running."""
    keep: list[int] = []
    for position, (row, token) in enumerate(zip(rows, tokens)):
        if finished[row]:  # a row kept only so the mask keeps padding (see _with_a_padded_row)
            continue
        finished[row], watched[row] = take_token(generated[row], token, watched=watched[row],
                                                 eos_token_id=eos_token_id, max_new_tokens=max_new_tokens,
                                                 marker_check=marker_check)
        if not finished[row]:
            keep.append(position)
    return keep


def _with_a_padded_row(keep: list[int], rows: list[int], padded: list[bool]) -> list[int]:
    """transformers drops an all-ones mask (another attention path): while the batch has a mask, keep one padded
    row, as the full batch would, so every step runs the attention the batch ran."""
    if any(padded[rows[position]] for position in keep):
        return keep
    return sorted([*keep, next(position for position, row in enumerate(rows) if padded[row])])
