"""A row, its task types and length limits, and the seeded sampling every task's rows are drawn with."""
from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterator, Sequence

from alpaca_qlora.evaluation.answer_text import word_count  # a short answer here is one the EM metric counts as short

Row = dict[str, str]

TASK_TYPES = ("closed_qa", "factual", "classification", "open_ended")
SHORT_ANSWER_MAX_WORDS = 5
OPEN_ENDED_WORDS = (30, 90)
OPEN_ENDED_SENTENCES = (2, 5)


def is_short(answer: str) -> bool:
    return word_count(answer) <= SHORT_ANSWER_MAX_WORDS


def make_row(instruction: str, input_text: str, output: str, task_type: str) -> Row:
    return {"instruction": instruction, "input": input_text, "output": output, "task_type": task_type}


def take(rng: random.Random, pool: Sequence, count: int) -> list:
    """A seeded sample, in pool order, so the rows keep the (sorted) order of their facts."""
    if count >= len(pool):
        return list(pool)
    chosen = set(rng.sample(range(len(pool)), count))
    return [item for index, item in enumerate(pool) if index in chosen]


def distinct_pairs(rng: random.Random, pool: Sequence, key: Callable[[object], Hashable]) -> Iterator[tuple]:
    """Random pairs from the pool, endlessly, each unordered pair (by key) once; draw as many as needed."""
    seen = set()
    while True:
        first, second = rng.sample(pool, 2)
        pair = tuple(sorted((key(first), key(second))))
        if pair not in seen:
            seen.add(pair)
            yield first, second
