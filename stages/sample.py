"""sample: the seeded training sample and the stratified held-out evaluation split, leakage-checked.

The eval split draws eval.min_short_answer short-answer rows first (short as the evaluate stage decides it, from
the same eval params), so exact match rests on enough rows; where the data has fewer, the stage warns.

Outs: data/sampled/train.jsonl, data/sampled/eval.jsonl and metrics/sample.json.
"""
from __future__ import annotations

import logging
from pathlib import Path

import _venv_check  # noqa: F401 (first: says to activate the venv when a package is missing)

from alpaca_qlora import io
from alpaca_qlora.data.sampling import MIN_TRAIN_ROWS, split_rows
from alpaca_qlora.evaluation.metrics import is_short_answer
from alpaca_qlora.stage import read_input_rows, require_rows, run_stage
from alpaca_qlora.stage_params import stage_params

ROWS_IN = Path("data/raw/rows.jsonl")
TRAIN_OUT = Path("data/sampled/train.jsonl")
EVAL_OUT = Path("data/sampled/eval.jsonl")
METRICS_OUT = Path("metrics/sample.json")

log = logging.getLogger("sample")


def main() -> None:
    params = stage_params("sample")
    rows = read_input_rows(ROWS_IN, "fetch")
    short_types, max_words = params.eval.short_answer_task_types, params.eval.short_answer_max_words
    split = split_rows(rows, sample_frac=params.data.sample_frac, eval_size=params.data.eval_size,
                       seed=params.data.seed, min_short_answer=params.eval.min_short_answer,
                       is_short=lambda row: is_short_answer(row.get("task_type"), row["output"],
                                                            short_answer_task_types=short_types, max_words=max_words))
    require_rows(split.train, "the training sample", f"all {len(rows) - len(split.eval)} rows left after the eval "
                 "split ask an eval row's question; lower data.eval_size or use more data.")
    report = split.report
    if report["eval_short_answer_rows"] < report["eval_short_answer_rows_wanted"]:
        log.warning("exact match will rest on only %d short-answer eval rows (eval.min_short_answer = %d): the data "
                    "has no more references of at most %d words%s", report["eval_short_answer_rows"],
                    params.eval.min_short_answer, max_words,
                    f" in task types {', '.join(short_types)}" if any(row.get("task_type") for row in rows) else "")
    if split.report["train_rows"] < split.report["train_rows_requested"]:
        log.warning("only %d training rows available of %d requested", split.report["train_rows"],
                    split.report["train_rows_requested"])
    if len(split.train) < MIN_TRAIN_ROWS:
        log.warning("data.sample_frac = %g leaves %d training row(s), fewer than %d: too few to learn from; raise "
                    "data.sample_frac (or use more data)", params.data.sample_frac, len(split.train), MIN_TRAIN_ROWS)
    io.write_jsonl(TRAIN_OUT, split.train)
    io.write_jsonl(EVAL_OUT, split.eval)
    io.write_json(METRICS_OUT, split.report)
    log.info("train %d rows, eval %d rows (%d short-answer), eval/train overlap %d", len(split.train),
             len(split.eval), report["eval_short_answer_rows"], report["eval_train_overlap"])


if __name__ == "__main__":
    run_stage(main)
