"""Paired bootstrap intervals and McNemar's exact test for base-vs-fine-tuned deltas, and how the report shows them."""
from __future__ import annotations

import math
import random

import pytest

from alpaca_qlora.evaluation.metrics import aggregate, metric_deltas, score_row
from alpaca_qlora.evaluation.report import NOT_SIGNIFICANT, render_report
from alpaca_qlora.evaluation.significance import (
    PAIRED_METRICS,
    UnpairedRowsError,
    compare_paired,
    delta_significance,
    exact_match_mcnemar,
    mcnemar_exact_p,
    pair_rows,
    with_significance,
)

RESAMPLES = 10_000
REFERENCES = ["Paris", "blue", "Na", "the cat sat on the mat in the afternoon sun", "positive"]
WRONG = ["London", "red", "potassium", "a dog barked", "negative, I think"]


def predictions(seed: int, right: float, stop: float, n: int = 120) -> list[dict]:
    """Scored predictions of the same n rows; `seed` decides which rows this model gets right."""
    layout = random.Random(0)  # the rows (references, task types) are the same for every model
    answers = random.Random(seed)
    rows = []
    for index in range(n):
        reference = layout.choice(REFERENCES)
        task_type = layout.choice(["factual", "open_ended"])
        answer = reference if answers.random() < right else answers.choice(WRONG)
        short = len(reference.split()) <= 5
        proxies = {"label_adherence": answers.random() < right if task_type == "factual" else None,
                   "unsupported_word_share": round(answers.random() * (1 - right), 6),
                   "cut_by_limit": answers.random() < (1 - stop) / 2}
        rows.append({"id": f"row-{index:03d}", "task_type": task_type, "reference": reference, "answer": answer,
                     "prompt": f"### Instruction:\nQ{index}\n\n### Response:\n", "short_answer": short,
                     "stopped_by_eos": answers.random() < stop, **score_row(answer, reference, short_answer=short),
                     **proxies})
    return rows


BASE = predictions(seed=1, right=0.3, stop=0.4)
TUNED = predictions(seed=2, right=0.55, stop=0.8)


def test_same_seed_gives_the_same_intervals_and_another_seed_others():
    first = delta_significance(BASE, TUNED, resamples=RESAMPLES, seed=7)
    assert delta_significance(BASE, TUNED, resamples=RESAMPLES, seed=7) == first
    assert delta_significance(list(reversed(BASE)), TUNED[::-1], resamples=RESAMPLES, seed=7)["overall"] == \
        first["overall"]  # row order does not matter
    assert delta_significance(BASE, TUNED, resamples=RESAMPLES, seed=8)["overall"] != first["overall"]


def test_point_estimates_equal_the_reported_deltas_and_lie_in_their_intervals():
    reported = metric_deltas(aggregate(BASE), aggregate(TUNED))["overall"]
    results = compare_paired(BASE, TUNED, resamples=RESAMPLES, seed=42)
    assert set(results) == set(PAIRED_METRICS)
    for name, result in results.items():
        assert result.delta == reported[f"{name}_delta"], name
        assert result.ci_low <= result.delta <= result.ci_high, name
        assert result.ci_low < result.ci_high, name
    assert results["exact_match"].n_rows == aggregate(TUNED)["overall"]["n_short_answer"]
    assert results["stop_rate"].n_rows == len(TUNED)
    assert results["exact_match"].significant and results["stop_rate"].significant


def test_identical_predictions_give_a_zero_width_interval_at_zero_and_p_one():
    keys = delta_significance(BASE, BASE, resamples=RESAMPLES, seed=42)["overall"]
    for name in PAIRED_METRICS:
        assert keys[f"{name}_delta_ci_low"] == keys[f"{name}_delta_ci_high"] == 0.0, name
    assert keys["exact_match_mcnemar_p"] == 1.0


def test_a_small_noisy_change_spans_zero():
    nearly = [dict(row) for row in BASE]
    flipped = next(row for row in nearly if row["short_answer"] and not row["exact_match"])
    flipped.update(answer=flipped["reference"], **score_row(flipped["reference"], flipped["reference"],
                                                             short_answer=True))
    result = compare_paired(BASE, nearly, resamples=RESAMPLES, seed=42)["exact_match"]
    assert result.delta > 0 and result.ci_low <= 0 < result.ci_high and not result.significant


def test_mcnemar_exact_p_against_hand_computed_values():
    # 1 vs 9 discordant pairs: 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024, abs=1e-15)
    assert mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)
    # 0 vs 5: 2 / 32; an even split is p = 1 (capped, not 2 * (more than half))
    assert mcnemar_exact_p(0, 5) == pytest.approx(1 / 16)
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    # many pairs: stays exact where a float 2**n would overflow to inf
    assert 0 < mcnemar_exact_p(400, 700) < 1e-15
    expected = 2 * sum(math.comb(1100, k) for k in range(401)) / 2 ** 1100
    assert mcnemar_exact_p(400, 700) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_counts_discordant_exact_matches_on_short_answer_rows_only():
    pairs = pair_rows(BASE, TUNED)
    counts = exact_match_mcnemar(pairs)
    short = [(before, after) for before, after in pairs if after["short_answer"]]
    assert counts["exact_match_only_before"] == sum(b["exact_match"] and not a["exact_match"] for b, a in short)
    assert counts["exact_match_only_after"] == sum(a["exact_match"] and not b["exact_match"] for b, a in short)
    assert counts["exact_match_mcnemar_p"] == mcnemar_exact_p(counts["exact_match_only_before"],
                                                              counts["exact_match_only_after"])


def test_metrics_file_keys_are_flat_beside_each_delta_overall_and_per_task_type():
    deltas = with_significance(metric_deltas(aggregate(BASE), aggregate(TUNED)),
                               delta_significance(BASE, TUNED, resamples=RESAMPLES, seed=42))
    for block in [deltas["overall"], *deltas["by_task_type"].values()]:
        for name in PAIRED_METRICS:
            assert f"{name}_delta" in block and f"{name}_delta_ci_low" in block and f"{name}_delta_ci_high" in block
        assert isinstance(block["exact_match_mcnemar_p"], float)
        assert all(not isinstance(value, (dict, list)) for value in block.values())


def test_rows_are_paired_by_id_and_disjoint_predictions_fail_clearly():
    assert [after["id"] for _, after in pair_rows(BASE[:5], TUNED[3:8])] == ["row-003", "row-004"]
    with pytest.raises(UnpairedRowsError, match="share no row id"):
        pair_rows(BASE[:5], TUNED[5:10])


def _report(base, tuned):
    deltas = with_significance(metric_deltas(aggregate(base), aggregate(tuned)),
                               delta_significance(base, tuned, resamples=RESAMPLES, seed=42))
    return render_report(aggregate(base), aggregate(tuned), deltas, {"wins": [], "losses": []},
                         title_context={"eval rows": len(base)})


def _row(report: str, first_cell: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {first_cell} |"))


def test_report_marks_deltas_whose_interval_spans_zero_and_only_those():
    unchanged = _report(BASE, BASE)
    for name in PAIRED_METRICS:
        assert NOT_SIGNIFICANT in _row(unchanged, name), name  # [0, 0] spans 0
    changed = _report(BASE, TUNED)
    assert NOT_SIGNIFICANT not in _row(changed, "exact_match") and NOT_SIGNIFICANT not in _row(changed, "stop_rate")
    assert "[+" in _row(changed, "exact_match")
    assert "Exact McNemar p for exact_match" in changed
    factual = _row(changed, "factual")
    assert factual.count("[") == 1  # the EM delta's interval in the task-type table


def test_fewer_than_ten_thousand_resamples_is_a_config_error():
    from alpaca_qlora.config import ConfigError
    from support.params import embedded_params

    assert embedded_params(eval={"bootstrap_resamples": "2e4"}).eval.bootstrap_resamples == 20_000
    with pytest.raises(ConfigError, match="eval.bootstrap_resamples = 500 is invalid"):
        embedded_params(eval={"bootstrap_resamples": 500})
