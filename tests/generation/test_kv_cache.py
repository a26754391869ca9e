"""The in-place KV cache (generation/kv_cache.py) against transformers' DynamicCache: the same keys and values after
a prefill, decoding steps and dropped rows, and the same model outputs."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from alpaca_qlora.generation.kv_cache import PreallocatedLayer, preallocated_cache


def _states(rows: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2, positions, 4, generator=generator, dtype=torch.float64),
            torch.randn(rows, 2, positions, 4, generator=generator, dtype=torch.float64))


def test_layer_holds_what_a_dynamic_layer_holds_through_steps_and_dropped_rows():
    ours, theirs = PreallocatedLayer(capacity=9), DynamicLayer()
    steps = [_states(5, 4, 0), _states(5, 1, 1), _states(5, 1, 2)]
    for keys, values in steps:
        got, expected = ours.update(keys, values), theirs.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    kept = torch.tensor([0, 3, 4])
    ours.batch_select_indices(kept)
    theirs.batch_select_indices(kept)
    keys, values = _states(3, 1, 3)
    got, expected = ours.update(keys, values), theirs.update(keys, values)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert ours.get_seq_length() == theirs.get_seq_length() == 7
    assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)


def test_layer_refuses_more_positions_than_it_holds():
    layer = PreallocatedLayer(capacity=4)
    layer.update(*_states(2, 4, 0))
    with pytest.raises(ValueError, match="holds 4 positions"):
        layer.update(*_states(2, 1, 1))


def test_model_outputs_equal_with_either_cache(embedded):
    """A padded prefill and decoding steps through the embedded model (full attention in every layer): logits
    equal bit for bit."""
    network, _, _ = embedded
    input_ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    caches = {"dynamic": DynamicCache(config=network.config),
              "preallocated": preallocated_cache(network.config, capacity=8)}
    assert all(isinstance(layer, PreallocatedLayer) for layer in caches["preallocated"].layers)
    logits = {}
    with torch.no_grad():
        for name, cache in caches.items():
            ids, step_mask, outputs = input_ids, mask, []
            for _ in range(3):
                out = network(input_ids=ids, attention_mask=step_mask, past_key_values=cache, use_cache=True)
                outputs.append(out.logits[:, -1])
                ids = out.logits[:, -1:].argmax(-1)
                step_mask = torch.cat([step_mask, step_mask.new_ones((2, 1))], dim=-1)
            logits[name] = torch.stack(outputs)
    assert torch.equal(logits["dynamic"], logits["preallocated"])
