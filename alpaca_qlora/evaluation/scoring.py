"""Generations turned into scored prediction rows: the one place that decides what an answer is and how it scores.

The evaluate stage and any bench that reports "EM as the stage computes it" call `score_generations`, so the cut at
the stop marker, the short-answer rule and the limit check cannot drift apart between them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from alpaca_qlora.config import EvalParams
from alpaca_qlora.data.prompts import PromptTemplate
from alpaca_qlora.evaluation.metrics import cut_by_limit, is_short_answer, score_row
from alpaca_qlora.stop_rule import clean_generation


class GeneratedText(Protocol):
    """What scoring reads of a generation (`alpaca_qlora.generation.Generation` has it)."""

    raw: str
    stopped_by_eos: bool
    new_tokens: int


def score_generations(rows: Sequence[dict[str, Any]], generations: Sequence[GeneratedText], template: PromptTemplate,
                      eval_params: EvalParams, max_new_tokens: int) -> list[dict[str, Any]]:
    """Each row with its answer (cut at the template's stop markers), the raw text, and its per-row scores."""
    markers = template.stop_markers
    predictions = []
    for row, generation in zip(rows, generations, strict=True):
        answer = clean_generation(generation.raw, markers)
        short = is_short_answer(row.get("task_type"), row["reference"],
                                short_answer_task_types=eval_params.short_answer_task_types,
                                max_words=eval_params.short_answer_max_words)
        predictions.append({
            **row,
            "answer": answer,
            "raw": generation.raw,
            "stopped_by_eos": generation.stopped_by_eos,
            "new_tokens": generation.new_tokens,
            "short_answer": short,
            "cut_by_limit": cut_by_limit(generation.raw, stopped_by_eos=generation.stopped_by_eos,
                                         new_tokens=generation.new_tokens, max_new_tokens=max_new_tokens,
                                         stop_markers=markers),
            **score_row(answer, row["reference"], short_answer=short,
                        context=f"{row['instruction']}\n{row['input']}", task_type=row.get("task_type")),
        })
    return predictions
