"""format: apply the prompt template, tokenize with the model's tokenizer, and mask the prompt out of the loss.

Outs: data/formatted/train.jsonl ({id, input_ids, labels}), data/formatted/eval.jsonl (the prompts to answer,
with references and their token counts), metrics/format.json and the token-length histogram for `dvc plots`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import _venv_check  # noqa: F401 (first: says to activate the venv when a package is missing)

from alpaca_qlora import io
from alpaca_qlora.data.formatting import (
    format_report,
    length_histogram,
    length_stats,
    require_training_examples,
    response_token_count,
    row_prompt,
    tokenize_training_rows,
)
from alpaca_qlora.data.prompts import get_template
from alpaca_qlora.models.loading import load_tokenizer, resolve_model_source
from alpaca_qlora.stage import read_input_rows, run_stage
from alpaca_qlora.stage_params import stage_params

TRAIN_IN = Path("data/sampled/train.jsonl")
EVAL_IN = Path("data/sampled/eval.jsonl")
TRAIN_OUT = Path("data/formatted/train.jsonl")
EVAL_OUT = Path("data/formatted/eval.jsonl")
METRICS_OUT = Path("metrics/format.json")
HISTOGRAM_OUT = Path("metrics/plots/token_lengths.json")

log = logging.getLogger("format")


def main() -> None:
    params = stage_params("format")
    template = get_template(params.data.template)
    tokenizer = load_tokenizer(resolve_model_source(params.model.name))
    train_rows = read_input_rows(TRAIN_IN, "sample")
    examples, counts = tokenize_training_rows(
        train_rows, tokenizer, template, max_length=params.train.max_seq_length, overlong=params.data.overlong
    )
    require_training_examples(examples, train_rows, tokenizer, template, max_length=params.train.max_seq_length,
                              overlong=params.data.overlong)
    eval_prompts = [
        {
            "id": row["id"],
            "task_type": row.get("task_type"),
            "prompt": row_prompt(template, row),
            "instruction": row["instruction"],  # the prompt's own words, for the unsupported-words proxy
            "input": row.get("input", ""),
            "reference": row["output"],
            "reference_tokens": response_token_count(tokenizer, row["output"]),  # sizes eval.max_new_tokens: auto
        }
        for row in read_input_rows(EVAL_IN, "sample")
    ]
    report = format_report(examples, counts, rows_in=len(train_rows))
    report["eval_reference_tokens"] = length_stats([row["reference_tokens"] for row in eval_prompts])
    io.write_jsonl(TRAIN_OUT, examples)
    io.write_jsonl(EVAL_OUT, eval_prompts)
    io.write_json(METRICS_OUT, report)
    io.write_json(HISTOGRAM_OUT, length_histogram([len(example["input_ids"]) for example in examples]))
    log.info(
        "%d training examples (%d truncated, %d dropped as over-long), %.1f%% of tokens labelled; %d eval prompts",
        report["rows_kept"], report["rows_truncated"], report["rows_dropped_overlong"],
        100 * report["labelled_token_fraction"], len(eval_prompts),
    )


if __name__ == "__main__":
    run_stage(main)
