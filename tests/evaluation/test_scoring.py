"""Generations turned into scored prediction rows, as the evaluate stage and the sure-model bench record them."""
from __future__ import annotations

import pytest

from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.evaluation.scoring import score_generations
from alpaca_qlora.generation import Generation
from support.params import embedded_params

ROWS = [
    {"id": "a", "instruction": "What is the capital of France?", "input": "", "reference": "Paris",
     "task_type": "factual"},
    {"id": "b", "instruction": "Describe Paris.", "input": "", "reference": "Paris is the capital of France.",
     "task_type": "open_ended"},
    {"id": "c", "instruction": "Name a noble gas.", "input": "", "reference": "Neon", "task_type": None},
]
GENERATIONS = [
    Generation("Paris\n\n### Instruction:\nName a city.", stopped_by_eos=False, new_tokens=8),  # a marker ended it
    Generation("Paris is a big city on the", stopped_by_eos=False, new_tokens=8),  # the limit ended it
    Generation(" Argon ", stopped_by_eos=True, new_tokens=3),
]


def test_answers_are_cut_at_the_stop_marker_and_short_answers_are_marked():
    eval_params = embedded_params().eval  # short: at most 5 words and, where rows have one, a short task type
    marked, limited, untyped = score_generations(ROWS, GENERATIONS, ALPACA, eval_params, max_new_tokens=8)
    assert marked["answer"] == "Paris" and marked["raw"] == GENERATIONS[0].raw
    assert marked["short_answer"] is True and marked["exact_match"] and marked["exact_match_strict"]
    assert marked["cut_by_limit"] is False and marked["stopped_by_eos"] is False and marked["new_tokens"] == 8
    assert limited["answer"] == limited["raw"] and limited["cut_by_limit"] is True
    assert limited["short_answer"] is False and limited["exact_match_strict"] is None  # strict EM: short rows only
    assert untyped["answer"] == "Argon" and untyped["short_answer"] is True and not untyped["exact_match"]
    assert untyped["cut_by_limit"] is False
    assert [row["id"] for row in (marked, limited, untyped)] == ["a", "b", "c"]  # each row keeps its own fields
    assert all({"f1", "unsupported_word_share", "label_adherence"} <= set(row) for row in (marked, limited, untyped))


def test_every_row_needs_its_generation():
    with pytest.raises(ValueError):
        score_generations(ROWS, GENERATIONS[:2], ALPACA, embedded_params().eval, max_new_tokens=8)
