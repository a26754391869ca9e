from __future__ import annotations

import json
from collections import Counter

import pytest

from alpaca_qlora.data.bundled import generate_rows
from alpaca_qlora.evaluation.metrics import (
    MetricsMismatchError,
    aggregate,
    cut_by_limit,
    exact_match,
    is_label_row,
    is_short_answer,
    key_fact_recall,
    metric_deltas,
    score_row,
    strict_exact_match,
    token_f1,
    unsupported_word_share,
)
from support.alpaca_like import alpaca_like_rows


def test_accents_are_not_folded_away():
    assert not exact_match("café", "cafe")


def test_exact_match_normalized_and_strict():
    assert exact_match("The answer: Paris.", "answer paris")
    assert exact_match("“Paris”", "paris")
    assert not exact_match("Paris is the capital", "Paris")
    assert strict_exact_match("  Paris\n", "Paris")
    assert not strict_exact_match("paris", "Paris")
    assert not strict_exact_match("Paris.", "Paris")


def test_token_f1_worked_examples():
    # "cat sat on mat" vs "cat on mat": 3 common, precision 3/4, recall 3/3 -> 2 * .75 * 1 / 1.75
    assert token_f1("The cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # repeated tokens only count as often as they occur in both: precision 1/3, recall 1
    assert token_f1("yes yes yes", "Yes") == pytest.approx(0.5)
    assert token_f1("blue whale", "blue whale") == 1.0
    assert token_f1("red", "blue") == 0.0


def test_token_f1_empty_cases():
    assert token_f1("", "the") == 1.0  # both normalize to nothing
    assert token_f1("", "Paris") == 0.0
    assert token_f1("Paris", "...") == 0.0


def test_key_fact_recall():
    reference = "The capital of France is Paris."  # content words: capital, france, paris
    assert key_fact_recall("Paris, the capital of France.", reference) == 1.0
    assert key_fact_recall("It is in Paris", reference) == pytest.approx(1 / 3)
    assert key_fact_recall("paris paris paris", reference) == pytest.approx(1 / 3)  # distinct words
    assert key_fact_recall("", reference) == 0.0
    assert key_fact_recall("anything", "It is what it is.") is None
    assert key_fact_recall("Yes, it is.", "No, it is not.") == 0.0  # negations and yes/no are facts


def test_is_short_answer():
    types = ("closed_qa", "factual")
    # the word limit holds with task types too: EM against a 30-word closed-QA reference measures wording
    assert not is_short_answer("closed_qa", "a long reference " * 10, short_answer_task_types=types, max_words=5)
    assert is_short_answer("closed_qa", "a short reference", short_answer_task_types=types, max_words=5)
    assert not is_short_answer("brainstorming", "Yes", short_answer_task_types=types, max_words=5)
    assert is_short_answer(None, "one two three four five", short_answer_task_types=types, max_words=5)
    assert not is_short_answer(None, "one two three four five six", short_answer_task_types=types, max_words=5)
    assert is_short_answer("", "Paris", short_answer_task_types=types, max_words=5)


def test_score_row():
    short = score_row("Paris.", "Paris", short_answer=True)
    assert short == {"exact_match": True, "exact_match_strict": False, "f1": 1.0, "key_fact_recall": 1.0,
                     "answer_words": 1, "reference_words": 1, "unsupported_word_share": None,
                     "label_adherence": None}
    long = score_row("Paris is nice", "Paris", short_answer=False)
    assert long["exact_match"] is False and long["exact_match_strict"] is None
    assert long["f1"] == 0.5 and long["answer_words"] == 3


def scored(task_type, answer, reference, *, short, eos=True):
    return {"task_type": task_type, "short_answer": short, "stopped_by_eos": eos,
            **score_row(answer, reference, short_answer=short)}


def test_aggregate_overall_and_by_task_type():
    rows = [
        scored("closed_qa", "Paris", "Paris", short=True),
        scored("closed_qa", "paris.", "Paris", short=True, eos=False),
        scored("closed_qa", "Lyon", "Paris", short=True),
        scored("open_qa", "A long and rambling answer about Rome", "Rome is old", short=False),
    ]
    result = aggregate(rows)
    closed = result["by_task_type"]["closed_qa"]
    assert closed == {"n_rows": 3, "n_short_answer": 3, "exact_match": 0.666667, "exact_match_strict": 0.333333,
                      "f1": 0.666667, "f1_all": 0.666667, "verbosity": 1.0, "stop_rate": 0.666667,
                      "key_fact_recall": 0.666667, "n_label_rows": 0, "label_adherence": None,
                      "unsupported_word_share": None, "cut_by_limit_rate": None}
    open_qa = result["by_task_type"]["open_qa"]
    # no short-answer rows: EM and F1 are not measured (None), not zero
    assert open_qa["exact_match"] is None and open_qa["exact_match_strict"] is None and open_qa["f1"] is None
    # "long and rambling answer about rome" vs "rome is old": 1 common, precision 1/6, recall 1/3 -> 2/9
    assert open_qa["f1_all"] == pytest.approx(2 / 9, abs=1e-6)
    assert open_qa["verbosity"] == pytest.approx(7 / 3, abs=1e-6)
    assert open_qa["key_fact_recall"] == 0.5  # rome found, old missing
    overall = result["overall"]
    assert overall["n_rows"] == 4 and overall["n_short_answer"] == 3
    assert overall["exact_match"] == 0.666667  # short-answer rows only
    assert overall["verbosity"] == pytest.approx(10 / 6, abs=1e-6)  # total answer words / total reference words
    assert overall["stop_rate"] == 0.75
    json.dumps(result)  # plain JSON types only


def test_aggregate_rows_without_task_type_and_none_recall():
    rows = [scored(None, "It is.", "It is.", short=True), {**scored(None, "", "Yes", short=True)}]
    rows[1].pop("task_type")
    result = aggregate(rows)
    assert list(result["by_task_type"]) == ["all"]
    assert result["by_task_type"]["all"] == result["overall"]
    assert result["overall"]["key_fact_recall"] == 0.0  # "It is." has no content words: only the second row counts
    assert result["overall"]["exact_match"] == 0.5


def test_aggregate_of_nothing_has_no_metrics():
    assert aggregate([])["overall"]["exact_match"] is None
    assert aggregate([])["overall"]["verbosity"] is None


def block(**values):
    metrics = {"n_rows": 10, "n_short_answer": 4, "exact_match": 0.25, "exact_match_strict": 0.0, "f1": 0.5,
               "f1_all": 0.3, "verbosity": 2.0, "stop_rate": 0.5, "key_fact_recall": None}
    return {**metrics, **values}


def test_metric_deltas():
    base = {"overall": block(f1_all=0.1), "by_task_type": {"qa": block()}, "run": {"model": "base"}}
    finetuned = {"overall": block(exact_match=0.75, verbosity=1.2, key_fact_recall=0.4, n_short_answer=4),
                 "by_task_type": {"qa": block(f1=None)}, "run": {"model": "tuned"}}
    deltas = metric_deltas(base, finetuned)
    assert set(deltas) == {"overall", "by_task_type"}
    overall = deltas["overall"]
    assert overall["exact_match_delta"] == 0.5
    assert overall["f1_all_delta"] == 0.2  # rounded, not 0.19999999999999998
    assert overall["verbosity_delta"] == -0.8
    assert overall["exact_match_strict_delta"] == 0.0
    assert overall["key_fact_recall_delta"] is None  # base has none
    assert overall["n_rows"] == 10 and "n_short_answer_delta" not in overall and "n_rows_delta" not in overall
    assert deltas["by_task_type"]["qa"]["f1_delta"] is None
    assert deltas["by_task_type"]["qa"]["f1_all_delta"] == 0.0


def test_metric_deltas_refuse_different_rows():
    base = {"overall": block(), "by_task_type": {"qa": block()}}
    finetuned = {"overall": block(n_rows=9), "by_task_type": {"qa": block(n_rows=9)}}
    with pytest.raises(MetricsMismatchError, match="different rows"):
        metric_deltas(base, finetuned)


def test_cut_by_limit_only_when_neither_eos_nor_a_marker_ended_the_answer():
    markers = ("### ",)
    assert cut_by_limit("and so on and so", stopped_by_eos=False, new_tokens=8, max_new_tokens=8, stop_markers=markers)
    assert not cut_by_limit("done", stopped_by_eos=True, new_tokens=8, max_new_tokens=8, stop_markers=markers)
    assert not cut_by_limit("done\n\n### Instruction", stopped_by_eos=False, new_tokens=8, max_new_tokens=8,
                            stop_markers=markers)
    assert not cut_by_limit("done\n\n###", stopped_by_eos=False, new_tokens=8, max_new_tokens=8, stop_markers=markers)
    assert not cut_by_limit("short", stopped_by_eos=False, new_tokens=3, max_new_tokens=8, stop_markers=markers)


def test_cut_rate_is_aggregated_per_model_and_differenced():
    def row(cut):
        return {"task_type": None, "short_answer": False, "stopped_by_eos": not cut, "cut_by_limit": cut,
                **score_row("an answer", "a reference", short_answer=False, context="q")}
    base = aggregate([row(True), row(True), row(False), row(True)])
    tuned = aggregate([row(False), row(False), row(False), row(True)])
    assert base["overall"]["cut_by_limit_rate"] == 0.75 and tuned["overall"]["cut_by_limit_rate"] == 0.25
    assert metric_deltas(base, tuned)["overall"]["cut_by_limit_rate_delta"] == -0.5


def test_unsupported_word_share():
    context = "What is the capital of France?\n"
    assert unsupported_word_share("Paris", context, "Paris") == 0.0
    assert unsupported_word_share("The capital of France is Paris.", context, "Paris") == 0.0  # stop words ignored
    assert unsupported_word_share("Paris, a city founded by Napoleon", context, "Paris") == pytest.approx(3 / 4)
    assert unsupported_word_share("It is that.", context, "Paris") is None  # no content words


def test_bundled_classification_rows_state_their_labels_and_only_they_count_as_label_rows():
    rows = generate_rows()
    label_rows = Counter(row["task_type"] for row in rows
                         if is_label_row(row["task_type"], f"{row['instruction']}\n{row['input']}", row["output"]))
    classification = sum(row["task_type"] == "classification" for row in rows)
    assert set(label_rows) == {"classification"}
    assert label_rows["classification"] >= 0.95 * classification  # "Of A and B, which ..." offers no "or" list


def test_label_rows_without_task_types_are_those_whose_reference_is_an_offered_option():
    rows = alpaca_like_rows(1000)
    label_rows = [row for row in rows if is_label_row(None, f"{row['instruction']}\n{row['input']}", row["output"])]
    assert label_rows and all(len(row["output"].split()) == 1 for row in label_rows)
    scored = score_row("Positive, because the food was good", "Negative", short_answer=True,
                       context="Classify the sentiment of this review as positive or negative.\nAwful.")
    assert scored["label_adherence"] is False
    assert score_row("positive", "Negative", short_answer=True,
                     context="Classify the sentiment as positive or negative.")["label_adherence"] is True
    assert score_row("Paris", "Paris", short_answer=True, context="Capital of France?")["label_adherence"] is None


def test_proxies_aggregate_per_task_type_and_difference():
    context = "Is sodium a metal, a nonmetal or a metalloid?"

    def row(answer, task_type="classification"):
        return {"task_type": task_type, "short_answer": True, "stopped_by_eos": True,
                **score_row(answer, "metal", short_answer=True, context=context, task_type=task_type)}
    base = aggregate([row("Sodium is a shiny metal"), row("metal"), row("a soft metal", "factual")])
    tuned = aggregate([row("metal"), row("metal"), row("metal", "factual")])
    assert base["by_task_type"]["classification"]["label_adherence"] == 0.5
    assert base["by_task_type"]["classification"]["n_label_rows"] == 2
    assert base["by_task_type"]["factual"]["n_label_rows"] == 0  # a factual row is no label row
    assert base["overall"]["unsupported_word_share"] == pytest.approx((1 / 3 + 0 + 1 / 2) / 3, abs=1e-6)  # shiny; soft
    deltas = metric_deltas(base, tuned)["overall"]
    assert deltas["label_adherence_delta"] == 0.5
    assert deltas["unsupported_word_share_delta"] == pytest.approx(-5 / 18, abs=1e-6)
    assert "n_label_rows_delta" not in deltas
