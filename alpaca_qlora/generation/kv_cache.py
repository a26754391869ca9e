"""A KV cache that is written in place: transformers' DynamicCache, with each full-attention layer's keys and values
held in a buffer sized for the whole generation.

DynamicCache grows a layer by `torch.cat` at every step, which copies the layer's whole cache each time: on CPU in
float64, with long answers, that copy costs more memory traffic than reading the weights. Here a step writes its one
new position into the buffer and the layer hands attention a view of the filled part, so the keys and values that
attention sees, and therefore the tokens, are the ones DynamicCache gives (tested against `generate()`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers of `capacity` positions, filled from the left.

    `keys`/`values` are views of the filled positions, as DynamicLayer's tensors are the filled cache; dropping rows
    (`batch_select_indices`) copies only the filled positions of the rows kept."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = _buffer(key_states, key_states.shape[0], self.capacity)
        self.value_buffer = _buffer(value_states, value_states.shape[0], self.capacity)
        self.length = 0
        self.is_initialized = True
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"the preallocated KV cache holds {self.capacity} positions; {end} were asked for")
        self.key_buffer[:, :, self.length : end].copy_(key_states)
        self.value_buffer[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.key_buffer = _kept_rows(self.key_buffer, indices, self.length)
        self.value_buffer = _kept_rows(self.value_buffer, indices, self.length)
        self._expose()

    def stack(self, parts: Sequence[PreallocatedLayer], width: int) -> None:
        """Hold `parts`' rows one after another, each part's positions ending at `width`; the positions a part does
        not hold (columns that were padding in all its rows) are zero, hidden by the mask as padding is."""
        keys, values = parts[0].keys, parts[0].values
        rows = sum(part.keys.shape[0] for part in parts)
        self.dtype, self.device = keys.dtype, keys.device
        self.key_buffer = keys.new_zeros((rows, keys.shape[1], self.capacity, keys.shape[3]))
        self.value_buffer = values.new_zeros((rows, values.shape[1], self.capacity, values.shape[3]))
        row = 0
        for part in parts:
            count = part.keys.shape[0]
            self.key_buffer[row : row + count, :, width - part.length : width] = part.keys
            self.value_buffer[row : row + count, :, width - part.length : width] = part.values
            row += count
        self.length, self.is_initialized = width, True
        self._expose()

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]


def _buffer(like: torch.Tensor, rows: int, capacity: int) -> torch.Tensor:
    """An uninitialised (rows, heads, capacity, head_dim) buffer; positions past the filled length are never read."""
    return like.new_empty((rows, like.shape[1], capacity, like.shape[3]))


def _kept_rows(buffer: torch.Tensor, indices: torch.Tensor, length: int) -> torch.Tensor:
    kept = _buffer(buffer, indices.numel(), buffer.shape[2])
    kept[:, :, :length] = buffer[indices, :, :length]
    return kept


def preallocated_cache(config: Any, capacity: int) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers hold `capacity` positions in place; layers of another
    kind (sliding windows, ...) keep DynamicCache's own, so the cache behaves as DynamicCache does."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def is_preallocated(cache: DynamicCache) -> bool:
    return all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)


def stacked_cache(config: Any, capacity: int, width: int, parts: Sequence[DynamicCache]) -> DynamicCache:
    """One cache for a batch whose rows were prefilled in consecutive chunks (`parts`, preallocated caches each
    filled with the batch's last positions), holding `capacity` positions of which `width` are filled."""
    cache = preallocated_cache(config, capacity)
    for index, layer in enumerate(cache.layers):
        layer.stack([part.layers[index] for part in parts], width)
    return cache
