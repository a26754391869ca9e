"""Seeded train sample and stratified held-out split, with a leakage check that must come out zero."""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alpaca_qlora.data.records import prompt_key
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.evaluation.metrics import NO_TASK_TYPE

# Fewer training rows than this teach a model little beyond noise: the sample stage warns (1e-6 of the bundled set
# trained on one row without a word).
MIN_TRAIN_ROWS = 32


class SamplingError(PipelineError, ValueError):
    """The requested split can't be drawn from the data (e.g. the eval split is as large as the data)."""


@dataclass(frozen=True)
class Split:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    report: dict[str, Any]


def proportional_allocation(group_sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` across groups in proportion to their sizes (largest remainder; ties by name)."""
    population = sum(group_sizes.values())
    exact = {name: total * size / population for name, size in group_sizes.items()}
    counts = {name: min(int(value), group_sizes[name]) for name, value in exact.items()}
    remainder_order = sorted(group_sizes, key=lambda name: (-(exact[name] - int(exact[name])), name))
    while sum(counts.values()) < total:
        progressed = False
        for name in remainder_order:
            if sum(counts.values()) >= total:
                break
            if counts[name] < group_sizes[name]:
                counts[name] += 1
                progressed = True
        if not progressed:
            break
    return counts


def _shuffled(rows: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    ordered = sorted(rows, key=lambda row: row["id"])  # independent of the source file's order
    rng.shuffle(ordered)
    return ordered


def _by_task_type(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row.get("task_type") or NO_TASK_TYPE].append(row)
    return groups


def _stratified_draw(rows: list[dict[str, Any]], count: int, rng: random.Random) -> list[dict[str, Any]]:
    """`count` rows, each task type in proportion to its share of `rows`."""
    groups = _by_task_type(rows)
    allocation = proportional_allocation({name: len(group) for name, group in groups.items()}, count)
    drawn: list[dict[str, Any]] = []
    for name in sorted(groups):
        drawn.extend(_shuffled(groups[name], rng)[: allocation[name]])
    return drawn


def split_rows(rows: list[dict[str, Any]], *, sample_frac: float, eval_size: int, seed: int,
               min_short_answer: int = 0, is_short: Callable[[dict[str, Any]], bool] | None = None) -> Split:
    """Draw the evaluation split first, then the training sample from what is left.

    The eval split is stratified by short answer (as `is_short` decides) and, within each, by task type. Short-answer
    rows get their proportional share or `min_short_answer`, whichever is larger (all of them where the data has
    fewer), and are drawn first, so exact match rests on enough rows even where short answers are rare (as in
    alpaca-cleaned: README, "Split"); data that has enough keeps its natural mix.
    It does not depend on `sample_frac`, so experiments that change the training sample are scored on the very
    same rows and their EM deltas compare like with like (and the base model's evaluation stays cached).
    Training rows that ask the same question as an eval row (same normalized instruction + input) are excluded.
    """
    if eval_size >= len(rows):
        raise SamplingError(
            f"data.eval_size = {eval_size} leaves no rows to train on: the data has {len(rows)} rows. "
            f"Lower data.eval_size or use more data."
        )
    rng = random.Random(seed)
    short_rows = [row for row in rows if is_short(row)] if is_short else []
    short_ids = {row["id"] for row in short_rows}
    other_rows = [row for row in rows if row["id"] not in short_ids]
    short_wanted = min(min_short_answer, eval_size) if is_short else 0
    proportional = proportional_allocation({"short": len(short_rows), "other": len(other_rows)}, eval_size)
    short_count = min(len(short_rows), max(short_wanted, proportional["short"], eval_size - len(other_rows)))
    eval_rows = _stratified_draw(short_rows, short_count, rng)
    eval_rows += _stratified_draw(other_rows, eval_size - short_count, rng)
    eval_rows = _shuffled(eval_rows, rng)
    eval_short = short_count if is_short else None

    eval_ids = {row["id"] for row in eval_rows}
    eval_keys = {prompt_key(row) for row in eval_rows}
    candidates = [row for row in rows if row["id"] not in eval_ids]
    overlapping = [row for row in candidates if prompt_key(row) in eval_keys]
    candidates = [row for row in candidates if prompt_key(row) not in eval_keys]

    wanted = max(1, round(sample_frac * len(rows)))
    train_rows = _shuffled(candidates, rng)[:wanted]
    train_keys = {prompt_key(row) for row in train_rows}
    leaked = sum(prompt_key(row) in train_keys for row in eval_rows)
    if leaked:
        raise AssertionError(f"{leaked} eval rows share their instruction+input with training rows")

    report = {
        "rows_available": len(rows),
        "train_rows": len(train_rows),
        "train_rows_requested": wanted,
        "eval_rows": len(eval_rows),
        "eval_rows_by_task_type": {name: len(group) for name, group in sorted(_by_task_type(eval_rows).items())},
        "short_answer_rows_available": len(short_rows) if is_short else None,
        "eval_short_answer_rows": eval_short,  # the rows exact match rests on
        "eval_short_answer_rows_wanted": short_wanted,
        "excluded_as_eval_duplicates": len(overlapping),
        "eval_train_overlap": leaked,
    }
    return Split(train=train_rows, eval=eval_rows, report=report)
