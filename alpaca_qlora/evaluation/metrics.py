"""Scoring generated answers against references: per row, then overall and per task type.

Exact match is only meaningful where the reference is a short answer ("Paris", "positive"), so EM and F1 are
averaged over short-answer rows; verbosity, stop rate, key-fact recall and `f1_all` cover every row, because
instruction tuning mostly changes *how* a model answers (length, stopping) and that shows on long answers too.
Two automatic proxies stand in for what a reader judges: unsupported words (hallucination) and whether a
classification answer is exactly one of the labels the prompt offers (instruction adherence). The share of answers
cut by the token limit says whether the other numbers measure the model or the limit.
Every function here is pure; the evaluate stage feeds it rows and writes what it returns.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.evaluation.answer_text import (
    STOP_WORDS,
    is_stated_option,
    normalize_answer,
    normalized_words,
    word_count,
)
from alpaca_qlora.stop_rule import stop_position

# Rows of data without task types (alpaca-cleaned) are grouped under this name, as the sample stage reports them.
NO_TASK_TYPE = "all"
DECIMALS = 6  # metrics are rounded so that re-running on equal answers gives byte-equal JSON

# Metrics added for issue 11 (section 4), listed once so that reports and interval code can pick them up by name.
PROXY_METRICS = ("unsupported_word_share", "label_adherence")
LIMIT_METRICS = ("cut_by_limit_rate",)
# Task types whose rows are label choices; rows without a task type qualify by their reference alone.
LABEL_TASK_TYPES = frozenset({"classification"})


class MetricsMismatchError(PipelineError, ValueError):
    """Base and fine-tuned metrics were computed on different rows, so their difference means nothing."""


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def strict_exact_match(prediction: str, reference: str) -> bool:
    """Equal up to surrounding white space: shows how much of the EM gain is only formatting."""
    return prediction.strip() == reference.strip()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: partial credit for an answer that contains the reference among other words."""
    predicted, expected = normalized_words(prediction), normalized_words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def key_fact_recall(prediction: str, reference: str) -> float | None:
    """Share of the reference's distinct content words that the answer mentions.

    For long answers EM is always 0 and F1 punishes any rewording; recall of content words asks only whether the
    answer says the things the reference says. None when the reference has no content words, so such rows are
    left out of the mean instead of counting as perfect or as failed.
    """
    facts = {token for token in normalized_words(reference) if token not in STOP_WORDS}
    if not facts:
        return None
    return len(facts & set(normalized_words(prediction))) / len(facts)


def is_short_answer(
    task_type: str | None, reference: str, *, short_answer_task_types: Sequence[str], max_words: int
) -> bool:
    """Whether EM is meaningful for the row: a reference of at most `max_words` words, and, where the data has task
    types, one of the configured short-answer types.

    The word limit holds for every row (EM against a 30-word closed-QA reference measures wording, not facts); the
    types only narrow it where they exist (a one-word brainstorm reference is still an open task). Rows without a
    task type (alpaca-cleaned) are decided by the length of their reference alone.
    """
    if word_count(reference) > max_words:
        return False
    return not task_type or task_type in short_answer_task_types


def unsupported_word_share(answer: str, context: str, reference: str) -> float | None:
    """Hallucination proxy: the share of the answer's distinct content words found in neither the prompt (its
    instruction and input) nor the reference.

    Words are normalized as for EM and stop words ignored, so rewording with function words costs nothing; a
    synonym or another inflection of a supported word counts as unsupported, so this over-counts a little and is
    read as a delta between models on the same rows. None when the answer has no content words.
    """
    words = {token for token in normalized_words(answer) if token not in STOP_WORDS}
    if not words:
        return None
    supported = set(normalized_words(context)) | set(normalized_words(reference))
    return len(words - supported) / len(words)


def is_label_row(task_type: str | None, context: str, reference: str) -> bool:
    """Whether instruction adherence is measurable: the prompt offers options and the reference is one of them.

    With task types only classification rows qualify; without them (alpaca-cleaned) any row whose reference is
    exactly one option of its prompt ("Is this review positive or negative?" -> "Negative") does. Requiring the
    reference to pass keeps rows out whose options the parser misreads.
    """
    if task_type and task_type not in LABEL_TASK_TYPES:
        return False
    return is_stated_option(reference, context)


def cut_by_limit(raw: str, *, stopped_by_eos: bool, new_tokens: int, max_new_tokens: int,
                 stop_markers: Sequence[str]) -> bool:
    """Whether the token limit, not the model, ended the answer: no EOS, no stop marker, all tokens used."""
    if stopped_by_eos or new_tokens < max_new_tokens:
        return False
    return stop_position(raw, stop_markers) is None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, DECIMALS)


def score_row(answer: str, reference: str, *, short_answer: bool, context: str | None = None,
              task_type: str | None = None) -> dict[str, Any]:
    """Per-row metrics. Strict EM is only recorded on short-answer rows, where it is compared with EM. `context` is
    the prompt's instruction and input; without it the two proxies are not measured (None)."""
    measured = context is not None
    label_row = measured and is_label_row(task_type, context, reference)
    return {
        "exact_match": exact_match(answer, reference),
        "exact_match_strict": strict_exact_match(answer, reference) if short_answer else None,
        "f1": _rounded(token_f1(answer, reference)),
        "key_fact_recall": _rounded(key_fact_recall(answer, reference)),
        "answer_words": word_count(answer),
        "reference_words": word_count(reference),
        "unsupported_word_share": _rounded(unsupported_word_share(answer, context, reference)) if measured else None,
        "label_adherence": is_stated_option(answer, context) if label_row else None,
    }


def _mean(values: Iterable[float | bool | None]) -> float | None:
    """Mean of the values that exist; None (not 0) when none do, so "not measured" never reads as "all wrong"."""
    present = [float(value) for value in values if value is not None]
    return _rounded(sum(present) / len(present)) if present else None


def _summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    short = [row for row in rows if row["short_answer"]]
    reference_words = sum(row["reference_words"] for row in rows)
    answer_words = sum(row["answer_words"] for row in rows)
    return {
        "n_rows": len(rows),
        "n_short_answer": len(short),
        "exact_match": _mean(row["exact_match"] for row in short),
        "exact_match_strict": _mean(row["exact_match_strict"] for row in short),
        "f1": _mean(row["f1"] for row in short),
        "f1_all": _mean(row["f1"] for row in rows),
        "verbosity": _rounded(answer_words / reference_words) if reference_words else None,
        "stop_rate": _mean(row["stopped_by_eos"] for row in rows),
        "key_fact_recall": _mean(row["key_fact_recall"] for row in rows),
        "n_label_rows": sum(row.get("label_adherence") is not None for row in rows),
        "label_adherence": _mean(row.get("label_adherence") for row in rows),
        "unsupported_word_share": _mean(row.get("unsupported_word_share") for row in rows),
        "cut_by_limit_rate": _mean(row.get("cut_by_limit") for row in rows),
    }


def task_type_of(row: dict[str, Any]) -> str:
    return row.get("task_type") or NO_TASK_TYPE


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-task-type summaries of scored rows.

    Each row carries `task_type` (optional), score_row's keys, `short_answer`, `stopped_by_eos` and `cut_by_limit`
    (optional: rows without it leave the cut rate unmeasured). `n_short_answer` is how many rows EM rests on and
    `n_label_rows` how many label adherence rests on. Verbosity is
    total answer words over total reference words (the ratio of the means), so a few empty answers cannot
    divide by zero and long references weigh by their length.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[task_type_of(row)].append(row)
    return {
        "overall": _summary(rows),
        "by_task_type": {task_type: _summary(groups[task_type]) for task_type in sorted(groups)},
    }


def _difference(base: Any, finetuned: Any) -> float | None:
    numbers = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (base, finetuned))
    return _rounded(finetuned - base) if numbers else None


def _block_deltas(base: dict[str, Any], finetuned: dict[str, Any]) -> dict[str, Any]:
    metric_names = sorted(name for name in set(base) | set(finetuned) if not name.startswith("n_"))
    return {"n_rows": finetuned.get("n_rows"),
            **{f"{name}_delta": _difference(base.get(name), finetuned.get(name)) for name in metric_names}}


def _check_same_rows(base: dict[str, Any], finetuned: dict[str, Any]) -> None:
    blocks = {"overall": (base["overall"], finetuned["overall"])}
    for task_type in set(base["by_task_type"]) | set(finetuned["by_task_type"]):
        blocks[task_type] = (base["by_task_type"].get(task_type, {}), finetuned["by_task_type"].get(task_type, {}))
    differing = sorted(name for name, (before, after) in blocks.items() if before.get("n_rows") != after.get("n_rows"))
    if differing:
        counts = ", ".join(f"{name}: {blocks[name][0].get('n_rows')} vs {blocks[name][1].get('n_rows')}"
                           for name in differing)
        raise MetricsMismatchError(
            f"the base and fine-tuned evaluations scored different rows ({counts}), so their difference means "
            "nothing. One of them is stale: run `dvc repro` (or `python stages/evaluate.py`) to score both on "
            "the current data/formatted/eval.jsonl."
        )


def metric_deltas(base: dict[str, Any], finetuned: dict[str, Any]) -> dict[str, Any]:
    """Fine-tuned minus base for every metric, overall and per task type: the keys `dvc metrics diff` shows.

    Only `overall` and `by_task_type` are compared (a `run` block of settings is not a metric). Counts are not
    differenced; `n_rows` is carried so a delta can be read with its sample size.
    """
    _check_same_rows(base, finetuned)
    task_types = sorted(set(base["by_task_type"]) | set(finetuned["by_task_type"]))
    return {
        "overall": _block_deltas(base["overall"], finetuned["overall"]),
        "by_task_type": {task_type: _block_deltas(base["by_task_type"][task_type],
                                                  finetuned["by_task_type"][task_type])
                         for task_type in task_types},
    }
