"""Turning rows into model inputs: the templated prompt, token ids, and labels that train on the response only.

Ids are built as prompt ids + response ids (tokenized separately), so the boundary between what is masked and
what is learned is exact: no BPE merge can straddle it, and the prompt ids at evaluation time are the very ids
the model saw in training.
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from alpaca_qlora.data.prompts import PromptTemplate
from alpaca_qlora.errors import PipelineError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainingExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text (BOS for Mistral/Llama, nothing for many others)."""
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_specials) - len(without) + 1):
        if with_specials[start : start + len(without)] == without:
            return list(with_specials[:start])
    return []


@functools.lru_cache(maxsize=8)
def _cached_prefix(tokenizer: Any) -> tuple[int, ...]:
    return tuple(special_prefix(tokenizer))


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids exactly as training and generation both use them: BOS once (if the model has one), no EOS."""
    prefix = list(_cached_prefix(tokenizer))
    text_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if prefix and text_ids[: len(prefix)] == prefix:  # the text itself began with the BOS string
        text_ids = text_ids[len(prefix) :]
    return prefix + list(text_ids)


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Response ids followed by EOS, so the model learns to stop after answering."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: the model could not learn to stop. Set one first.")
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def build_training_example(
    prompt_ids: list[int],
    response_ids: list[int],
    *,
    max_length: int,
    overlong: Literal["truncate", "drop"],
) -> TrainingExample | None:
    """Labels are IGNORE_INDEX on the prompt; None when the row can't keep any labelled token (or must be dropped).

    Truncation cuts the response from the end (the prompt is the question and stays whole); a cut response loses
    its EOS, so the model is never taught to stop mid-answer.
    """
    total = len(prompt_ids) + len(response_ids)
    if total <= max_length:
        return TrainingExample(
            input_ids=prompt_ids + response_ids,
            labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
            truncated=False,
        )
    if overlong == "drop" or len(prompt_ids) >= max_length:
        return None
    kept_response = response_ids[: max_length - len(prompt_ids)]
    return TrainingExample(
        input_ids=prompt_ids + kept_response,
        labels=[IGNORE_INDEX] * len(prompt_ids) + kept_response,
        truncated=True,
    )


def row_prompt(template: PromptTemplate, row: dict[str, Any]) -> str:
    return template.render(row["instruction"], row.get("input", ""))


def tokenize_training_rows(
    rows: Iterable[dict[str, Any]],
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_length: int,
    overlong: Literal["truncate", "drop"],
) -> tuple[list[dict[str, Any]], Counter]:
    """Tokenized rows ({id, input_ids, labels}) and counts of what happened to the others."""
    counts: Counter = Counter()
    examples = []
    for row in rows:
        prompt_ids = encode_prompt(tokenizer, row_prompt(template, row))
        response_ids = encode_response(tokenizer, row["output"])
        example = build_training_example(prompt_ids, response_ids, max_length=max_length, overlong=overlong)
        if example is None:
            counts["dropped_overlong"] += 1
            continue
        counts["truncated"] += example.truncated
        counts["kept"] += 1
        examples.append({"id": row["id"], "input_ids": example.input_ids, "labels": example.labels})
    return examples, counts


def require_training_examples(
    examples: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_length: int,
    overlong: Literal["truncate", "drop"],
) -> None:
    """Refuse a max_length that keeps no row, naming the length that would keep some (train would fail obscurely)."""
    if examples or not rows:
        return
    lengths = []
    for row in rows:
        prompt = len(encode_prompt(tokenizer, row_prompt(template, row)))
        lengths.append((prompt, prompt + len(encode_response(tokenizer, row["output"]))))
    shortest_prompt = min(prompt for prompt, _ in lengths)
    keeps_all = max(total for _, total in lengths)
    lost = f"train.max_seq_length = {max_length} keeps none of the {len(rows)} training rows"
    if overlong == "truncate":
        raise PipelineError(
            f"{lost}: the shortest prompt is {shortest_prompt} tokens, leaving no room for any response token. "
            f"Set train.max_seq_length to at least {shortest_prompt + 1} to keep rows ({keeps_all} keeps every "
            f"row whole)."
        )
    shortest_row = min(lengths, key=lambda pair: pair[1])
    raise PipelineError(
        f"{lost} with data.overlong = drop: the shortest row is {shortest_row[1]} tokens (its prompt "
        f"{shortest_row[0]}). Set train.max_seq_length to at least {shortest_row[1]} ({keeps_all} keeps every row), "
        f"or data.overlong = truncate to keep rows whose prompt is shorter than the limit."
    )


def response_token_count(tokenizer: Any, response: str) -> int:
    """Tokens a model must generate to say `response`, before its EOS: what the token limit has to cover."""
    return len(encode_response(tokenizer, response)) - 1


def stop_margin(tokenizer: Any, stop_markers: Iterable[str]) -> int:
    """Tokens a finished answer still needs to end: its EOS, or a blank line and a stop marker's visible part."""
    marker_tokens = [len(tokenizer(("\n\n" + marker).rstrip(), add_special_tokens=False)["input_ids"])
                     for marker in stop_markers]
    return max([1, *marker_tokens])


def nearest_rank(ordered: list[int], q: float) -> int:
    """The q-quantile of sorted values by the nearest-rank rule: at least a share q of the values are <= it."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


REFERENCE_COVERAGE = 0.99  # eval.max_new_tokens: auto leaves at most 1% of references longer than the limit


def token_limit(requested: int | str, reference_tokens: list[int], *, margin: int, cap: int) -> dict[str, Any]:
    """The generation limit for eval.max_new_tokens (an integer, or auto) and how many references it would cut.

    auto lets at least 99% of the references finish, EOS or stop marker included, so the metrics measure the
    model rather than the limit; `cap` bounds the cost, and the share of references a limit would cut is
    reported either way, so a capped or hand-set limit that cuts answers is never silent.
    """
    if not reference_tokens:
        raise ValueError("no eval references to size eval.max_new_tokens by; the eval split is empty.")
    covering = nearest_rank(sorted(reference_tokens), REFERENCE_COVERAGE) + margin
    limit = min(covering, cap) if requested == "auto" else int(requested)
    over = sum(count + margin > limit for count in reference_tokens)
    return {"max_new_tokens": limit, "max_new_tokens_requested": requested, "covering_99pct": covering,
            "references_over_limit": round(over / len(reference_tokens), 6)}


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)

    def percentile(q: float) -> int:
        return nearest_rank(ordered, q)

    return {
        "count": len(ordered),
        "mean": round(sum(ordered) / len(ordered), 2),
        "p50": percentile(0.50),
        "p95": percentile(0.95),
        "max": ordered[-1],
        "min": ordered[0],
    }


def length_histogram(lengths: list[int], bin_width: int = 32) -> list[dict[str, int]]:
    """Rows for `dvc plots`: how many examples fall in each token-length bin (upper bound inclusive)."""
    if not lengths:
        return []
    bins = Counter((length - 1) // bin_width for length in lengths)
    return [{"tokens": (index + 1) * bin_width, "rows": bins.get(index, 0)} for index in range(max(bins) + 1)]


def format_report(examples: list[dict[str, Any]], counts: Counter, rows_in: int) -> dict[str, Any]:
    lengths = [len(example["input_ids"]) for example in examples]
    labelled = [sum(label != IGNORE_INDEX for label in example["labels"]) for example in examples]
    total_tokens = sum(lengths)
    return {
        "rows_in": rows_in,
        "rows_kept": counts["kept"],
        "rows_truncated": counts["truncated"],
        "rows_dropped_overlong": counts["dropped_overlong"],
        "tokens_total": total_tokens,
        "labelled_tokens": sum(labelled),
        "labelled_token_fraction": round(sum(labelled) / total_tokens, 6) if total_tokens else 0.0,
        "sequence_length": length_stats(lengths),
        "labelled_length": length_stats(labelled),
    }
