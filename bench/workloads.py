"""The bench's training workloads, the same for every script and variant: dense micro-batches of random ids, and
Alpaca-length rows (prompt + response lengths from a log-normal fitted to alpaca-style data, median about 190
tokens, clipped to [48, 1024]) either padded 8 to a micro-batch or packed once into 2048-token best-fit-decreasing
bins, 4 to a micro-batch, through the train stage's own collators.
"""
from __future__ import annotations

import math
import random
from typing import Any

from alpaca_qlora.data.formatting import IGNORE_INDEX
from alpaca_qlora.training.data import ResponseOnlyCollator
from alpaca_qlora.training.packing import PackedCollator, PackedDataset

VOCAB_LOW, VOCAB_HIGH = 100, 31000


def dense_batches(count: int, rows: int, length: int, seed: int) -> list[list[dict[str, list[int]]]]:
    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        batch = []
        for _ in range(rows):
            ids = [1] + [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(length - 1)]
            batch.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
        batches.append(batch)
    return batches


def alpaca_rows(count: int, seed: int) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        total = int(min(1024, max(48, rng.lognormvariate(math.log(190), 0.6))))
        prompt = max(8, int(total * rng.uniform(0.35, 0.75)))
        ids = [1] + [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(total - 1)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def collate(rows_per_batch: list[list[Any]], packing: bool) -> tuple[list[dict], list[int]]:
    """Micro-batches of rows (padded, or with packing one 2048-token row per bin) or, with packing, of bins."""
    collator = PackedCollator(pad_token_id=0) if packing else ResponseOnlyCollator(pad_token_id=0)
    batches, useful = [], []
    for items in rows_per_batch:
        bins = [item if isinstance(item, list) else [item] for item in items]
        batches.append(collator(bins) if packing else collator(items))
        useful.append(sum(len(row["input_ids"]) for group in bins for row in group))
    return batches, useful


def chunk(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[start : start + size] for start in range(0, len(rows) - size + 1, size)]


def workloads(steps: int, warmup: int) -> tuple[list[list[dict[str, list[int]]]], list[dict[str, list[int]]]]:
    """The two workloads' rows, the same for every variant and script: dense micro-batches, Alpaca-length rows."""
    return (dense_batches(steps + warmup, rows=4, length=2048, seed=0),
            alpaca_rows(64 * (steps + warmup), seed=1))


def alpaca_micro_batches(rows: list[dict], packing: bool, count: int, bins: int = 4) -> list[list[Any]]:
    """Micro-batches of Alpaca-length rows: `bins` of the 2048-token bins all rows were packed into once (bins
    shuffled as the Trainer's sampler does), or 8 padded rows."""
    if not packing:
        return chunk(rows, 8)[:count]
    dataset = PackedDataset(rows, bin_tokens=2048, seed=0)
    order = list(range(len(dataset)))
    random.Random(0).shuffle(order)
    return chunk([dataset[index] for index in order], bins)[:count]
