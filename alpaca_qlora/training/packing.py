"""Padding-free training batches: whole rows packed into bins once per run, and attention that stays inside rows.

Bins are formed once over the whole training set by best-fit-decreasing, not inside each micro-batch: a
micro-batch of a few rows leaves little room to fill its bins, and its last bin's tail is padding. With bins
formed up front, the dataset yields bins, `train.micro_batch_size` counts bins of at most `train.max_seq_length`
tokens (so a micro-batch holds at most micro_batch_size x max_seq_length tokens, whatever the rows' lengths),
and the Trainer's seeded sampler shuffles bins each epoch. Every row is in exactly one bin, whole.

Why not `trl.pack_dataset(strategy="bfd")`: it packs each `datasets.map` batch separately (1,000 rows unless told
otherwise), silently truncates rows longer than a bin, and needs a `datasets.Dataset` of list columns only; the
project's rows carry ids, must never be cut, and trl is not otherwise a dependency.
"""
from __future__ import annotations

import bisect
import functools
import inspect
import logging
import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alpaca_qlora.data.formatting import IGNORE_INDEX
from alpaca_qlora.errors import PipelineError

log = logging.getLogger(__name__)

Row = dict[str, Any]
VARLEN_ATTENTION = "packed_varlen"  # the attention implementation's registered name


def best_fit_decreasing(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Row indices grouped into bins of at most `capacity` tokens: longest rows first, each into the fullest bin
    it fits. A seeded shuffle before the (stable) sort decides ties, so equal-length rows are not kept in file
    order and the same seed always gives the same bins."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda index: -lengths[index])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin number), sorted: the first fit found is the best fit
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise PipelineError(f"a row has {length} tokens, more than a bin's {capacity} (train.max_seq_length): "
                                "raise train.max_seq_length or lower data.max_length and rerun format.")
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            space, number = free.pop(at)
        else:
            space, number = capacity, len(bins)
            bins.append([])
        bins[number].append(index)
        if space - length > 0:
            bisect.insort(free, (space - length, number))
    return bins


class PackedDataset(torch.utils.data.Dataset):
    """The training rows as bins: item i is the list of rows of bin i."""

    def __init__(self, rows: Sequence[Row], bin_tokens: int, seed: int):
        for row in rows:
            if row["labels"][0] != IGNORE_INDEX:
                # Otherwise a row's first token would be predicted from the previous row of its bin.
                raise PipelineError(f"row {row.get('id')}: packing needs rows whose first token is a prompt token "
                                    "(label -100); rerun format, or set train.packing=false.")
        self.rows = list(rows)
        self.bin_tokens = bin_tokens
        self.bins = best_fit_decreasing([len(row["input_ids"]) for row in self.rows], bin_tokens, seed)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> list[Row]:
        return [self.rows[row] for row in self.bins[index]]

    def padding_share(self, bins_per_micro_batch: int, seed: int = 0) -> float:
        """Padding over computed tokens when shuffled bins form micro-batches, each padded to its longest bin."""
        used = [sum(len(self.rows[row]["input_ids"]) for row in group) for group in self.bins]
        random.Random(seed).shuffle(used)
        groups = [used[start : start + bins_per_micro_batch] for start in range(0, len(used), bins_per_micro_batch)]
        computed = sum(max(group) * len(group) for group in groups)
        return 1 - sum(used) / computed if computed else 0.0


@dataclass
class PackedCollator:
    """A micro-batch of bins: each bin's rows concatenated, positions restarting at 0 per row, bins right-padded
    to the longest bin.

    With no attention mask, transformers reads the position resets as row boundaries, so no row attends to another
    (tests compare packed and unpacked logits). The padding tail restarts its positions too: a segment of its own,
    with no labelled token.
    """

    pad_token_id: int = 0

    def __call__(self, bins: list[list[Row]]) -> dict[str, torch.Tensor]:
        packed = [([token for row in group for token in row["input_ids"]],
                   [label for row in group for label in row["labels"]],
                   [position for row in group for position in range(len(row["input_ids"]))]) for group in bins]
        width = max(len(input_ids) for input_ids, _, _ in packed)
        batch = {name: torch.empty((len(packed), width), dtype=torch.long)
                 for name in ("input_ids", "labels", "position_ids")}
        for index, (input_ids, labels, position_ids) in enumerate(packed):
            pad = width - len(input_ids)
            batch["input_ids"][index] = torch.tensor(input_ids + [self.pad_token_id] * pad)
            batch["labels"][index] = torch.tensor(labels + [IGNORE_INDEX] * pad)
            batch["position_ids"][index] = torch.tensor(position_ids + list(range(pad)))
        return batch


def packed_padding(labels: torch.Tensor, position_ids: torch.Tensor) -> int:
    """Padding tokens of a packed batch: each bin's last segment if it has no labelled token (real rows all do)."""
    padding = 0
    for bin_labels, bin_positions in zip(labels, position_ids):
        starts = (bin_positions == 0).nonzero().flatten()
        tail = int(starts[-1]) if len(starts) else 0
        if tail > 0 and bool((bin_labels[tail:] == IGNORE_INDEX).all()):
            padding += len(bin_labels) - tail
    return padding


# --- attention inside bins: a variable-length flash kernel instead of a materialized block mask ---------------

_segments: tuple[Any, torch.Tensor, int] | None = None  # (weakref to position_ids, cu_seqlens, longest segment)


def sequence_boundaries(position_ids: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor, int]:
    """Cumulative segment starts over the flattened micro-batch, and the longest segment. A segment starts at every
    bin start and wherever positions do not count up by one (transformers' own packed-sequence rule). Computed once
    per forward: every layer, and its recomputation, gets the same position_ids tensor."""
    global _segments
    if _segments is not None and _segments[0]() is position_ids:
        return _segments[1], _segments[2]
    flat = position_ids.expand(batch, length).reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::length] = True
    boundaries = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((boundaries[1:] - boundaries[:-1]).max())
    _segments = (weakref.ref(position_ids), boundaries, longest)
    return boundaries, longest


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, position_ids: torch.Tensor | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention per row segment through torch's variable-length flash kernel; anything it cannot serve
    (a padding mask, a KV cache, dropout, fp32) goes to transformers' sdpa path unchanged."""
    from torch.nn.attention.varlen import varlen_attn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, head_dim = query.shape
    compute_dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else (
        torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)
    if attention_mask is not None or key.shape[2] != length or dropout > 0 or compute_dtype is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, position_ids=position_ids, **kwargs)
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device).unsqueeze(0)
    boundaries, longest = sequence_boundaries(position_ids, batch, length)
    if boundaries.numel() - 1 == batch:  # one row per bin: sdpa's causal flash kernel, without varlen's copies
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, position_ids=position_ids, **kwargs)
    # Key and value heads go in unrepeated: the flash kernel serves grouped-query attention itself. torch 2.12 and
    # later ask for the switch; 2.11's varlen_attn has none and hands any head counts straight to that kernel.
    extra: dict[str, Any] = {}
    if key.shape[1] != heads and "enable_gqa" in varlen_parameters(varlen_attn):
        extra["enable_gqa"] = True
    window = (-1, 0) if sliding_window is None or longest <= sliding_window else (sliding_window - 1, 0)

    def flat(states: torch.Tensor) -> torch.Tensor:
        return states.transpose(1, 2).reshape(batch * length, states.shape[1], head_dim).to(compute_dtype)

    output = varlen_attn(flat(query), flat(key), flat(value), boundaries, boundaries, longest, longest,
                         scale=scaling, window_size=window, **extra)
    return output.view(batch, length, heads, head_dim), None


def varlen_attention_mask(*args: Any, **kwargs: Any) -> Any:
    """No mask for packed or dense rows (the kernel reads segments from position_ids); padded rows keep sdpa's."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def varlen_attention_available(device: str) -> bool:
    if device != "cuda":
        return False  # torch's varlen kernel is CUDA-only; CPU keeps sdpa under the block-diagonal mask
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return {"scale", "window_size"} <= varlen_parameters(varlen_attn)  # torch >= 2.11: 2.10's takes neither


@functools.cache
def varlen_parameters(varlen_attn: Any) -> frozenset[str]:
    """The keywords this torch's varlen_attn takes, read once (not at every layer's call)."""
    return frozenset(inspect.signature(varlen_attn).parameters)


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Switch a loaded transformers model (or a PEFT model around one) to the variable-length kernel."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_attention_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(VARLEN_ATTENTION)


def packed_attention(model: torch.nn.Module, device: str) -> str:
    """Attention for packed bins, as the train stage runs it; returns its name. The variable-length kernel on CUDA
    where the model runs sdpa; it has no term for what makes transformers choose eager for an architecture (Gemma
    2's soft-capped attention logits), so such a model keeps its own attention under the block-diagonal mask."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = base.config._attn_implementation
    if not varlen_attention_available(device):
        return own
    if own != "sdpa":
        log.info("packed rows keep %s attention under a block-diagonal mask: the variable-length kernel stands in "
                 "for sdpa only", own)
        return own
    use_varlen_attention(model)
    return "varlen"
