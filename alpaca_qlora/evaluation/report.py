"""The compare report: base and fine-tuned metrics side by side, and the rows where fine-tuning helped or hurt most.

Aggregates hide how a model changed; a handful of concrete wins and losses next to the reference shows whether a
gain is real (right facts) or formatting (shorter answers that happen to match). Everything here is a pure
function of the evaluate stage's outputs, so the report is byte-identical for identical predictions.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from alpaca_qlora.evaluation.metrics import LIMIT_METRICS, PROXY_METRICS, task_type_of
from alpaca_qlora.evaluation.significance import CONFIDENCE, is_significant

log = logging.getLogger(__name__)

# Per-row scores in the order they rank an example: a gained exact match beats any F1 change, F1 beats recall.
RANKING_METRICS = ("exact_match", "f1", "key_fact_recall")
OVERALL_METRICS = ("exact_match", "exact_match_strict", "f1", "f1_all", "verbosity", "stop_rate", "key_fact_recall",
                   *LIMIT_METRICS, *PROXY_METRICS)
METRIC_NOTES = {
    "exact_match": "normalized exact match, short-answer rows",
    "exact_match_strict": "exact match after strip only, short-answer rows",
    "f1": "token F1, short-answer rows",
    "f1_all": "token F1, all rows",
    "verbosity": "answer words / reference words",
    "stop_rate": "share of answers ended by EOS",
    "key_fact_recall": "share of the reference's content words in the answer",
    "cut_by_limit_rate": "share of answers ended by the token limit (no EOS, no stop marker)",
    "unsupported_word_share": "hallucination proxy: answer content words in neither prompt nor reference",
    "label_adherence": "instruction-adherence proxy: label rows answered with exactly one offered label",
}
MODELS = ("base", "finetuned")
TEXT_LIMIT = 400  # characters of a prompt or answer shown in the report; the predictions files have all of it
DELTA_DECIMALS = 6


def _row_scores(row: dict[str, Any]) -> tuple[float, ...]:
    """Missing scores count as 0 (e.g. no key facts in the reference): both models then score the same. Exact match
    counts only on short-answer rows, as in the aggregate: elsewhere a rewording would read as a win or a loss."""
    return tuple(0.0 if name == "exact_match" and not row.get("short_answer") else float(row.get(name) or 0)
                 for name in RANKING_METRICS)


def _example(base: dict[str, Any], finetuned: dict[str, Any], delta: tuple[float, ...]) -> dict[str, Any]:
    counted = [name for name in RANKING_METRICS if name != "exact_match" or finetuned.get("short_answer")]
    return {
        "id": finetuned["id"],
        "task_type": task_type_of(finetuned),
        "prompt": finetuned.get("prompt", ""),
        "reference": finetuned.get("reference", ""),
        "base_answer": base.get("answer", ""),
        "finetuned_answer": finetuned.get("answer", ""),
        "delta": {name: value for name, value in zip(RANKING_METRICS, delta) if name in counted},
    }


def select_examples(
    base_rows: Sequence[dict[str, Any]], finetuned_rows: Sequence[dict[str, Any]], k: int
) -> dict[str, list[dict[str, Any]]]:
    """The k rows the fine-tuned model improved most (`wins`) and worsened most (`losses`), joined on `id`.

    Rows are ranked by the fine-tuned minus base scores, exact match first, then F1, then key-fact recall; ties go
    to the smaller id so the choice never depends on the files' row order. Unchanged rows are neither.
    """
    base_by_id = {row["id"]: row for row in base_rows}
    scored = []
    for finetuned in finetuned_rows:
        base = base_by_id.get(finetuned["id"])
        if base is None:
            continue
        delta = tuple(round(after - before, DELTA_DECIMALS)
                      for after, before in zip(_row_scores(finetuned), _row_scores(base)))
        scored.append((delta, finetuned["id"], base, finetuned))
    unmatched = len(finetuned_rows) - len(scored)
    if unmatched:
        log.warning("%d fine-tuned rows have no base row with the same id; they are left out of the examples",
                    unmatched)
    no_change = (0.0,) * len(RANKING_METRICS)
    wins = sorted((item for item in scored if item[0] > no_change),
                  key=lambda item: (tuple(-value for value in item[0]), item[1]))
    losses = sorted((item for item in scored if item[0] < no_change), key=lambda item: (item[0], item[1]))
    take = max(k, 0)
    return {
        "wins": [_example(base, finetuned, delta) for delta, _, base, finetuned in wins[:take]],
        "losses": [_example(base, finetuned, delta) for delta, _, base, finetuned in losses[:take]],
    }


def truncate(text: str, limit: int = TEXT_LIMIT) -> str:
    """Cut long text at a word boundary near `limit` and say how much was left out."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    cut = cut if cut > limit // 2 else limit
    return f"{text[:cut].rstrip()} … (+{len(text) - cut} chars)"


def table_cell(text: str, limit: int = TEXT_LIMIT) -> str:
    """Text that stays inside one markdown table cell and is shown, not interpreted.

    Model output is untrusted markup: pipes would split the cell, newlines end the row, and `<tag>` would be
    rendered as HTML, so all three are escaped (newlines become <br>).
    """
    text = truncate(text.strip(), limit)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "<br>".join(lines) if any(lines) else "*(empty)*"


def format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_delta(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


NOT_SIGNIFICANT = "(n.s.)"
NOT_SIGNIFICANT_NOTE = f"{NOT_SIGNIFICANT} = not significant: the paired bootstrap interval touches or spans 0."


def delta_with_interval(delta: float | None, low: float | None, high: float | None) -> tuple[str, str]:
    """The delta cell, marked NOT_SIGNIFICANT where its interval does not exclude 0, and the interval cell."""
    if delta is None:
        return format_delta(delta), "n/a"
    marked = format_delta(delta) if is_significant(low, high) else f"{format_delta(delta)} {NOT_SIGNIFICANT}"
    return marked, "n/a" if low is None or high is None else f"[{format_delta(low)}, {format_delta(high)}]"


def delta_cells(deltas: dict[str, Any], name: str) -> tuple[str, str]:
    """delta_with_interval from a compare.json block; a delta with no interval computed gets a blank interval."""
    if f"{name}_delta_ci_low" not in deltas:
        return format_delta(deltas.get(f"{name}_delta")), ""
    return delta_with_interval(deltas.get(f"{name}_delta"), deltas.get(f"{name}_delta_ci_low"),
                               deltas.get(f"{name}_delta_ci_high"))


def format_p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}" if value < 0.001 else f"{value:.4f}"


def prompt_excerpt(prompt: str) -> str:
    """The instruction (and input) of a templated prompt: the fixed preamble and the empty response header say
    nothing about the example and would push the instruction out of the truncated cell."""
    lines = prompt.strip().split("\n")
    first_section = next((index for index, line in enumerate(lines) if line.startswith("### ")), 0)
    lines = lines[first_section:]
    if len(lines) > 1 and lines[-1].startswith("### "):
        lines = lines[:-1]
    return "\n".join(lines).strip()


def _context_lines(title_context: dict[str, Any]) -> list[str]:
    return [f"- **{name}**: {'none' if value is None else value}" for name, value in title_context.items()]


def _rests_on_lines(base_metrics: dict[str, Any], finetuned_metrics: dict[str, Any]) -> list[str]:
    """What the headline numbers rest on: the rows EM is counted on, and the token limit and how often it cut."""
    overall = finetuned_metrics["overall"]
    run = finetuned_metrics.get("run", {})
    lines = [f"- **exact match rests on** {format_value(overall.get('n_short_answer'))} short-answer rows of "
             f"{format_value(overall.get('n_rows'))}; label adherence on {format_value(overall.get('n_label_rows'))}."]
    if "max_new_tokens" in run:
        cut = ", ".join(f"{model} {format_value(metrics['overall'].get('cut_by_limit_rate'))}"
                        for model, metrics in (("base", base_metrics), ("fine-tuned", finetuned_metrics)))
        lines.append(f"- **token limit** {run['max_new_tokens']} new tokens (eval.max_new_tokens: "
                     f"{run.get('max_new_tokens_requested', run['max_new_tokens'])}; references longer than the "
                     f"limit: {format_value(run.get('references_over_limit'))}); answers cut by it: {cut}.")
    return lines


def _overall_table(base: dict[str, Any], finetuned: dict[str, Any], deltas: dict[str, Any]) -> list[str]:
    lines = [f"| metric | base | fine-tuned | delta | {CONFIDENCE:.0%} interval | what it measures |",
             "| --- | ---: | ---: | ---: | :---: | --- |"]
    for name in ("n_rows", "n_short_answer"):
        lines.append(f"| {name} | {format_value(base.get(name))} | {format_value(finetuned.get(name))} | | | rows |")
    for name in OVERALL_METRICS:
        delta, interval = delta_cells(deltas, name)
        lines.append(f"| {name} | {format_value(base.get(name))} | {format_value(finetuned.get(name))} | "
                     f"{delta} | {interval} | {METRIC_NOTES[name]} |")
    if "exact_match_mcnemar_p" in deltas:
        lines += ["", f"{NOT_SIGNIFICANT_NOTE} Exact McNemar p for exact_match: "
                  f"{format_p(deltas['exact_match_mcnemar_p'])}."]
    return lines


def _task_type_table(base: dict[str, Any], finetuned: dict[str, Any], deltas: dict[str, Any]) -> list[str]:
    lines = ["| task type | rows | short-answer rows | base EM | fine-tuned EM | EM delta | "
             f"{CONFIDENCE:.0%} interval "
             "| McNemar p |", "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: |"]
    for task_type in sorted(set(base) | set(finetuned)):
        before, after, block = base.get(task_type, {}), finetuned.get(task_type, {}), deltas.get(task_type, {})
        delta, interval = delta_cells(block, "exact_match")
        p_value = format_p(block.get("exact_match_mcnemar_p")) if after.get("n_short_answer") else "n/a"
        lines.append(f"| {table_cell(task_type)} | {format_value(after.get('n_rows'))} | "
                     f"{format_value(after.get('n_short_answer'))} | {format_value(before.get('exact_match'))} | "
                     f"{format_value(after.get('exact_match'))} | {delta} | {interval} | {p_value} |")
    return lines


def _example_lines(number: int, example: dict[str, Any]) -> list[str]:
    changes = ", ".join(f"{name} {format_delta(value)}" for name, value in example["delta"].items())
    return [
        f"### {number}. `{example['id']}` ({example['task_type']}): {changes}",
        "",
        "| | |",
        "| --- | --- |",
        f"| prompt | {table_cell(prompt_excerpt(example['prompt']))} |",
        f"| base answer | {table_cell(example['base_answer'])} |",
        f"| fine-tuned answer | {table_cell(example['finetuned_answer'])} |",
        f"| reference | {table_cell(example['reference'])} |",
        "",
    ]


def render_report(
    base_metrics: dict[str, Any],
    finetuned_metrics: dict[str, Any],
    deltas: dict[str, Any],
    examples: dict[str, list[dict[str, Any]]],
    *,
    title_context: dict[str, Any],
) -> str:
    """The markdown report (reports/compare.md): context, overall metrics, EM by task type, wins and losses."""
    lines = ["# Fine-tuned vs base model", "", *_context_lines(title_context), "",
             "## Overall", "", *_rests_on_lines(base_metrics, finetuned_metrics), "",
             *_overall_table(base_metrics["overall"], finetuned_metrics["overall"], deltas["overall"]), "",
             "## Exact match by task type", "", *_task_type_table(base_metrics["by_task_type"],
                                                                  finetuned_metrics["by_task_type"],
                                                                  deltas["by_task_type"]), ""]
    for title, key in (("Largest wins (fine-tuned better)", "wins"), ("Largest losses (fine-tuned worse)", "losses")):
        lines += [f"## {title}", ""]
        if not examples.get(key):
            lines += ["None: no row changed in this direction.", ""]
        for number, example in enumerate(examples.get(key, []), start=1):
            lines += _example_lines(number, example)
    return "\n".join(lines).rstrip("\n") + "\n"


def plot_rows(
    base_metrics: dict[str, Any],
    finetuned_metrics: dict[str, Any],
    base_rows: Sequence[dict[str, Any]],
    finetuned_rows: Sequence[dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """The data files `dvc plots` reads: EM per task type and model, and every answer's length per model.

    Task types without short-answer rows have no EM and are left out (a bar at 0 would read as "all wrong").
    """
    em_by_task_type = [
        {"task_type": task_type, "model": model, "exact_match": block["exact_match"]}
        for model, metrics in zip(MODELS, (base_metrics, finetuned_metrics))
        for task_type, block in sorted(metrics["by_task_type"].items())
        if block.get("exact_match") is not None
    ]
    answer_lengths = [
        {"id": row["id"], "model": model, "answer_words": row["answer_words"]}
        for model, rows in zip(MODELS, (base_rows, finetuned_rows))
        for row in sorted(rows, key=lambda row: row["id"])
    ]
    return {"em_by_task_type": em_by_task_type, "answer_lengths": answer_lengths}
