"""Packing: rows share bins but never attend across their boundaries, and train as the padded batches do."""
from __future__ import annotations

import inspect
import math
import random

import pytest
import torch

from alpaca_qlora.data.formatting import IGNORE_INDEX
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.loading import load_model
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.packing import PackedCollator, PackedDataset, best_fit_decreasing, sequence_boundaries
from alpaca_qlora.training.trainer import run_training
from support.training import GradientsAtStep, assert_packed_rows_apart, assert_same_gradients, make_job


def test_packed_rows_never_attend_across_row_boundaries(tiny_mistral_dir, tokenized):
    model = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu").eval()
    assert_packed_rows_apart(model, tokenized)
    assert PackedCollator()([tokenized])["position_ids"][0, len(tokenized[0]["input_ids"])] == 0


@pytest.mark.parametrize("max_seq_length", [2048, 100])  # all rows in one bin; bins of <= 100 tokens
def test_packed_and_padded_batches_give_the_same_gradient(tiny_mistral_dir, tokenized, tmp_path, max_seq_length):
    gradients, metrics = [], []
    for packing in (False, True):
        capture = GradientsAtStep()
        job = make_job(tiny_mistral_dir, tokenized, tmp_path / str(packing), max_steps=1, micro_batch_size=4,
                       packing=packing, max_grad_norm=0.0, callbacks=[capture], max_seq_length=max_seq_length)
        metrics.append(run_training(job, resume=False).metrics)
        gradients.append(capture.gradients)
    assert_same_gradients(gradients)
    # Padding never counts as a token seen: both layouts report the rows' own tokens.
    assert metrics[0]["tokens"] == metrics[1]["tokens"] == sum(len(row["input_ids"]) for row in tokenized)


def test_packing_into_bins_keeps_rows_apart_and_pads_only_the_tail(tiny_mistral_dir, tokenized):
    model = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu").eval()
    lengths = [len(row["input_ids"]) for row in tokenized]
    dataset = PackedDataset(tokenized, bin_tokens=max(lengths) + 1, seed=0)
    groups = [dataset[index] for index in range(len(dataset))]
    assert len(groups) > 1 and all(sum(len(r["input_ids"]) for r in g) <= max(lengths) + 1 for g in groups)
    batch = PackedCollator(pad_token_id=0)(groups)
    assert batch["input_ids"].shape[0] == len(groups)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for index, group in enumerate(groups):
            start = 0
            for row in group:
                alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[index, start : start + len(alone)], alone, rtol=1e-4, atol=1e-4)
                start += len(alone)
            assert (batch["labels"][index, start:] == IGNORE_INDEX).all()


def alpaca_like_rows(count: int, seed: int) -> list[dict]:
    """Rows with Alpaca's length spread (log-normal, median ~190 tokens, 48 to 1024), prompt tokens unlabelled."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        length = int(min(1024, max(48, rng.lognormvariate(math.log(190), 0.6))))
        rows.append({"id": str(index), "input_ids": [1] + [index % 30000 + 3] * (length - 1),
                     "labels": [IGNORE_INDEX] * (length // 2) + [5] * (length - length // 2)})
    return rows


@pytest.mark.parametrize("bin_tokens", [512, 2048])
def test_best_fit_bins_pad_at_most_two_percent_and_hold_every_row_once(bin_tokens):
    rows = [row for row in alpaca_like_rows(3000, seed=7) if len(row["input_ids"]) <= bin_tokens]
    dataset = PackedDataset(rows, bin_tokens=bin_tokens, seed=42)
    assert dataset.padding_share(bins_per_micro_batch=4) <= 0.02
    packed_ids = sorted(row["id"] for index in range(len(dataset)) for row in dataset[index])
    assert packed_ids == sorted(row["id"] for row in rows)
    assert all(sum(len(row["input_ids"]) for row in dataset[index]) <= bin_tokens for index in range(len(dataset)))
    assert PackedDataset(rows, bin_tokens=bin_tokens, seed=42).bins == dataset.bins  # seeded: the same bins


def test_a_row_longer_than_a_bin_is_refused():
    with pytest.raises(PipelineError, match="more than a bin"):
        best_fit_decreasing([10, 700], capacity=512, seed=0)


def test_an_epoch_of_packed_training_sees_every_row_exactly_once(tiny_mistral_dir, tokenized, tmp_path):
    rows = tokenized * 3
    seen: list[tuple[int, ...]] = []

    def record(module, args, kwargs):
        for ids, positions, labels in zip(kwargs["input_ids"], kwargs["position_ids"], kwargs["labels"]):
            starts = [*(positions == 0).nonzero().flatten().tolist(), len(ids)]
            for start, end in zip(starts, starts[1:]):
                if bool((labels[start:end] != IGNORE_INDEX).any()):  # a padding tail has no labelled token
                    seen.append(tuple(ids[start:end].tolist()))

    job = make_job(tiny_mistral_dir, rows, tmp_path, packing=True, max_steps=-1, epochs=1, micro_batch_size=2,
                   max_seq_length=100)
    hook = job.model.register_forward_pre_hook(record, with_kwargs=True)
    metrics = run_training(job, resume=False).metrics
    hook.remove()
    assert sorted(seen) == sorted(tuple(row["input_ids"]) for row in rows)
    assert metrics["attention"] == "sdpa"  # CPU keeps sdpa under the block-diagonal mask


def test_segment_boundaries_follow_position_resets_and_bin_starts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    boundaries, longest = sequence_boundaries(positions, batch=2, length=6)
    assert boundaries.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4


def _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch's varlen_attn as its flash kernel computes it (grouped-query heads included), on CPU: causal attention
    per segment of the flattened (tokens, heads, dim) inputs."""
    outputs = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        q, k, v = (states[start:end].transpose(0, 1).float() for states in (query, key, value))
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1).to(query.dtype))
    return torch.cat(outputs)


def _varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1)):
    _varlen_2_11.heads = (query.shape[1], key.shape[1], value.shape[1])
    return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale)


def _varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=None, enable_gqa=False):
    assert enable_gqa == (key.shape[1] != query.shape[1]), "2.13 refuses fewer key/value heads without enable_gqa"
    _varlen_2_13.heads = (query.shape[1], key.shape[1], value.shape[1])
    return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale)


def _varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    raise AssertionError("not called: no scale or window_size")


def test_the_stand_ins_keywords_are_the_installed_torchs_and_2_10_is_not_used(monkeypatch):
    """The 2.13 stand-in takes what the installed varlen_attn takes (the project pins torch 2.13), and a varlen_attn
    without scale and window_size (2.10's) is not used: CUDA then keeps sdpa under the block-diagonal mask."""
    import torch.nn.attention.varlen as varlen_module

    from alpaca_qlora.training.packing import varlen_attention_available

    installed = set(inspect.signature(varlen_module.varlen_attn).parameters)
    assert set(inspect.signature(_varlen_2_13).parameters) <= installed
    assert varlen_attention_available("cuda")
    monkeypatch.setattr(varlen_module, "varlen_attn", _varlen_2_10)
    assert not varlen_attention_available("cuda")


@pytest.mark.parametrize("varlen", [_varlen_2_11, _varlen_2_13], ids=["torch-2.11", "torch-2.13"])
def test_varlen_attention_hands_key_value_heads_over_unrepeated(monkeypatch, varlen):
    """Grouped-query heads reach the kernel as the model made them (no copies repeated to the query's head count),
    and packed segments attend as sdpa does to each sequence on its own."""
    import torch.nn.attention.varlen as varlen_module

    from alpaca_qlora.training.packing import varlen_attention_forward

    monkeypatch.setattr(varlen_module, "varlen_attn", varlen)
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 6, 8
    query = torch.randn(batch, heads, length, dim, generator=generator).bfloat16()
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator).bfloat16() for _ in range(2))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]])
    output, _ = varlen_attention_forward(torch.nn.Module(), query, key, value, None, scaling=dim ** -0.5,
                                         position_ids=positions)
    assert varlen.heads == (heads, kv_heads, kv_heads)
    for row, segments in enumerate([[(0, 3), (3, 6)], [(0, 4), (4, 6)]]):
        for start, end in segments:
            expected = torch.nn.functional.scaled_dot_product_attention(
                *(states[row:row + 1, :, start:end].float() for states in (query, key, value)), is_causal=True,
                scale=dim ** -0.5, enable_gqa=True).transpose(1, 2)
            torch.testing.assert_close(output[row:row + 1, start:end].float(), expected, atol=1e-2, rtol=1e-2)
