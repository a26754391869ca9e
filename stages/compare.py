"""compare: fine-tuned minus base for every metric with its error bar, a side-by-side report, and plots.

Outs: metrics/compare.json (the `*_delta` keys `dvc metrics diff` shows, each with its paired bootstrap interval
`*_delta_ci_low` / `*_delta_ci_high`, and `exact_match_mcnemar_p`), reports/compare.md, and the plot data
metrics/plots/em_by_task_type.json and metrics/plots/answer_lengths.json for `dvc plots show`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import _venv_check  # noqa: F401 (first: says to activate the venv when a package is missing)

from alpaca_qlora import io
from alpaca_qlora.evaluation.metrics import metric_deltas
from alpaca_qlora.evaluation.report import plot_rows, render_report, select_examples
from alpaca_qlora.evaluation.significance import CONFIDENCE, delta_significance, with_significance
from alpaca_qlora.stage import read_input_rows, run_stage
from alpaca_qlora.stage_params import stage_params

BASE_METRICS = Path("metrics/eval_base.json")
FINETUNED_METRICS = Path("metrics/eval_finetuned.json")
BASE_PREDICTIONS = Path("data/predictions/base.jsonl")
FINETUNED_PREDICTIONS = Path("data/predictions/finetuned.jsonl")
COMPARE_OUT = Path("metrics/compare.json")
REPORT_OUT = Path("reports/compare.md")
PLOTS_DIR = Path("metrics/plots")

log = logging.getLogger("compare")


def main() -> None:
    params = stage_params("compare")
    base, finetuned = io.read_json(BASE_METRICS), io.read_json(FINETUNED_METRICS)
    base_rows = read_input_rows(BASE_PREDICTIONS, "evaluate_base")
    finetuned_rows = read_input_rows(FINETUNED_PREDICTIONS, "evaluate_finetuned")
    deltas = metric_deltas(base, finetuned)  # first: it says clearly when the two evaluations are out of step
    deltas = with_significance(deltas, delta_significance(base_rows, finetuned_rows, seed=params.eval.bootstrap_seed,
                                                          resamples=params.eval.bootstrap_resamples))
    examples = select_examples(base_rows, finetuned_rows, params.eval.num_examples)
    report = render_report(base, finetuned, deltas, examples, title_context={
        "base model": base["run"]["model"],
        "adapter": finetuned["run"]["adapter"],
        "eval rows": base["overall"]["n_rows"],
        "quantized": base["run"]["quantized"],
        "intervals": f"{CONFIDENCE:.0%} paired bootstrap, {params.eval.bootstrap_resamples} resamples, seed "
                     f"{params.eval.bootstrap_seed}",
    })
    io.write_json(COMPARE_OUT, deltas)
    io.write_text(REPORT_OUT, report)
    for name, rows in plot_rows(base, finetuned, base_rows, finetuned_rows).items():
        io.write_json(PLOTS_DIR / f"{name}.json", rows)
    overall = deltas["overall"]
    log.info("EM delta %s [%s, %s] (McNemar p %s), strict %s, F1 delta %s, verbosity delta %s; report in %s",
             overall["exact_match_delta"], overall["exact_match_delta_ci_low"], overall["exact_match_delta_ci_high"],
             overall["exact_match_mcnemar_p"], overall["exact_match_strict_delta"], overall["f1_delta"],
             overall["verbosity_delta"], REPORT_OUT)


if __name__ == "__main__":
    run_stage(main)
