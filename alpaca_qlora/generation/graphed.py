"""Generation `graphed`: generate()'s model calls with the 4-bit layers untouched, the decoding step run over a
preallocated KV cache with fixed shapes, so on CUDA it is captured once per batch in a CUDA graph and replayed:
one launch per token instead of thousands of kernel launches from Python. Attention runs through sdpa with
`enable_gqa` (attention.py), which reads each key/value head once instead of repeating it per query head.

Rows stay in the batch (as in `plain`) and stops are checked every few steps, while the device decodes on. The
cache's unused tail is masked out, so attention sees the keys `plain` sees, but over a longer range and through
another kernel: on GPU near-tie argmaxes can flip, while a sure model's answers agree (README, "GPU numbers").
On CPU the same step runs eagerly and gives `generate()`'s tokens (tested).
"""
from __future__ import annotations

from typing import Any

import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.generation.attention import gqa_attention
from alpaca_qlora.generation.greedy import forward_model, greedy_tokens, prefill_inputs, take_token
from alpaca_qlora.generation.recording import NO_RECORDING, Recorder
from alpaca_qlora.generation.stop_checks import MarkerCheck


class StaticKVCache:
    """Keys and values of every layer in tensors preallocated for the whole generation, written in place at
    `write_positions` (a device tensor the decoding loop advances): fixed shapes and addresses, which is what a CUDA
    graph needs. Implements the part of transformers' Cache interface the decoder layers call (`update`)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_positions: torch.Tensor):
        self.keys, self.values, self.write_positions = keys, values, write_positions

    @classmethod
    def from_prefill(cls, cache: Any, slots: int, write_positions: torch.Tensor) -> StaticKVCache:
        """Copy a prefilled DynamicCache into tensors of `slots` positions (the rest zero, masked out)."""
        keys, values = [], []
        for layer in cache.layers:
            for source, target in ((layer.keys, keys), (layer.values, values)):
                static = source.new_zeros((*source.shape[:2], slots, source.shape[3]))
                static[:, :, : source.shape[2]] = source
                target.append(static)
        return cls(keys, values, write_positions)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.write_positions, key_states)
        self.values[layer_idx].index_copy_(2, self.write_positions, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class DecodeStep:
    """One greedy decoding step over a StaticKVCache, with every input in a fixed buffer: `ids` (the last
    tokens), `positions`, `mask` (which cache slots each row may attend to) and the cache's write position. On
    CUDA it is captured in a CUDA graph at the first call and replayed afterwards."""

    def __init__(self, network: Any, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor, *, use_graph: bool):
        self.network, self.cache, self.ids, self.positions, self.mask = network, cache, ids, positions, mask
        self.next_tokens = torch.empty(ids.shape[0], dtype=torch.long, device=ids.device)
        self.use_graph, self.graph = use_graph, None

    def _forward(self) -> None:
        logits = self.network(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions,
                              past_key_values=self.cache, use_cache=True, logits_to_keep=1, return_dict=True).logits
        self.next_tokens.copy_(greedy_tokens(logits))

    def _capture(self) -> None:
        # warm-up on a side stream (allocator, cuBLAS handles, lazy kernels), then capture; both recompute the
        # current step, whose cache slot and output the replay overwrites with the same values
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._forward()

    def __call__(self) -> torch.Tensor:
        """Attend to the current write slot, compute the next tokens, then move every buffer one step on."""
        self.mask.index_fill_(-1, self.cache.write_positions, True)
        if not self.use_graph:
            self._forward()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        self.ids.copy_(self.next_tokens[:, None])
        self.positions.add_(1)
        self.cache.write_positions.add_(1)
        return self.next_tokens


@torch.inference_mode()
def graphed_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    marker_check: MarkerCheck | None = None,
    check_every: int = 16,
    use_graph: bool | None = None,
    recorder: Recorder = NO_RECORDING,
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch with a static KV cache, the step graph-captured on CUDA.

    The prefill is `greedy_generate`'s (and `generate()`'s) first call; its cache is copied into a StaticKVCache
    of prompt + max_new_tokens slots. Each step attends to the prompt's real tokens and every generated one, the
    same keys `generate()`'s mask allows; masked slots add nothing. Rows keep decoding after they finish (their
    tokens are discarded, as `generate()` discards its padding). Every `check_every` steps the tokens so far are
    copied to the host without waiting, and the host checks the previous chunk while the device decodes on, so
    the device never idles for the stop checks; the run ends one chunk after every row is done.
    `use_graph`: None captures the step on CUDA only (False runs it eagerly, for profiling). `recorder` is told
    where the phases end: prefill, capture (the first step), decode (the rest), and the host's stop checks.
    """
    network = forward_model(model)
    batch, prompt_length = input_ids.shape
    slots = prompt_length + max_new_tokens
    window = getattr(network.config, "sliding_window", None)
    if window is not None and slots > window:
        raise PipelineError(f"graphed generation keeps every key in view, but the model attends within a "
                            f"{window}-token sliding window and this batch needs {slots} positions; use generation "
                            f"'plain' or 'fast'.")
    with gqa_attention(network):
        recorder.begin()
        step, first_tokens = _prefill_step(network, input_ids, attention_mask, slots=slots, use_graph=use_graph)
        recorder.mark("prefill")
        rows = _RowStops(batch, eos_token_id=eos_token_id, max_new_tokens=max_new_tokens, marker_check=marker_check)
        _decode(step, first_tokens, rows, max_new_tokens=max_new_tokens, check_every=check_every, recorder=recorder)
        recorder.mark("decode")
        return rows.generated


def _prefill_step(network: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, slots: int,
                  use_graph: bool | None) -> tuple[DecodeStep, torch.Tensor]:
    """The prefill (generate()'s first call), its cache copied into `slots` static slots, and the decoding step
    that continues from it, with the first generated tokens."""
    from transformers import DynamicCache

    device = input_ids.device
    batch, prompt_length = input_ids.shape
    position_ids, prefill_mask = prefill_inputs(attention_mask)
    prefill = network(input_ids=input_ids, attention_mask=prefill_mask, position_ids=position_ids,
                      past_key_values=DynamicCache(config=network.config), use_cache=True, logits_to_keep=1,
                      return_dict=True)
    first_tokens = greedy_tokens(prefill.logits)
    write_positions = torch.tensor([prompt_length], dtype=torch.long, device=device)
    cache = StaticKVCache.from_prefill(prefill.past_key_values, slots, write_positions)
    del prefill
    mask = torch.zeros((batch, 1, 1, slots), dtype=torch.bool, device=device)
    mask[:, 0, 0, :prompt_length] = attention_mask.bool()
    step = DecodeStep(network, cache, first_tokens[:, None].clone(), position_ids[:, -1:] + 1, mask,
                      use_graph=device.type == "cuda" if use_graph is None else use_graph)
    return step, first_tokens


def _decode(step: DecodeStep, first_tokens: torch.Tensor, rows: _RowStops, *, max_new_tokens: int,
            check_every: int, recorder: Recorder) -> None:
    """Step until every row stopped or the limit, handing the host each chunk of tokens one chunk late, so the
    device never waits for the stop checks."""
    history = [first_tokens]
    pending: _HostCopy | None = None
    checked = 0
    for produced in range(1, max_new_tokens + 1):
        last = produced == max_new_tokens
        if last or produced - checked >= check_every:
            copy = _HostCopy(torch.stack(history[checked:produced], dim=1))
            checked = produced
            if pending is not None:  # the chunk before: long finished on the device, so no wait here
                with recorder.host_work():
                    rows.take(pending.tokens())
            pending = copy
            if last or rows.all_finished():
                break
        history.append(step().clone())
        if produced == 1:
            recorder.mark("capture")  # the first step: graph capture (CUDA) plus one replay
    if pending is not None:
        with recorder.host_work():
            rows.take(pending.tokens())


class _HostCopy:
    """A chunk of tokens on its way to the host: a non-blocking copy into pinned memory on CUDA, read once done."""

    def __init__(self, tokens: torch.Tensor):
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = tokens.clone(), None

    def tokens(self) -> list[list[int]]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class _RowStops:
    """Each row's tokens up to its stop (take_token's rule), fed a chunk of steps at a time."""

    def __init__(self, batch: int, *, eos_token_id: int, max_new_tokens: int, marker_check: MarkerCheck | None):
        self.generated: list[list[int]] = [[] for _ in range(batch)]
        self.watched, self.finished = [False] * batch, [False] * batch
        self.eos_token_id, self.max_new_tokens, self.marker_check = eos_token_id, max_new_tokens, marker_check

    def take(self, chunk: list[list[int]]) -> None:
        for row, tokens in enumerate(chunk):
            for token in tokens:
                if self.finished[row]:
                    break
                self.finished[row], self.watched[row] = take_token(
                    self.generated[row], token, watched=self.watched[row], eos_token_id=self.eos_token_id,
                    max_new_tokens=self.max_new_tokens, marker_check=self.marker_check)

    def all_finished(self) -> bool:
        return all(self.finished)
