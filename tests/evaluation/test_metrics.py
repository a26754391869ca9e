import json

import pytest

from alpaca_qlora.evaluation.answer_text import normalize_answer, word_count
from alpaca_qlora.evaluation.metrics import (
    MetricsMismatchError,
    aggregate,
    exact_match,
    is_short_answer,
    key_fact_recall,
    metric_deltas,
    score_row,
    strict_exact_match,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),                 # article and case
        ("An apple, a pear.", "apple pear"),                  # articles and ASCII punctuation
        ("Theatre and anthem", "theatre and anthem"),         # articles only as whole words
        ("  New \t York\n City  ", "new york city"),         # white space collapsed
        ("“Paris”", "paris"),                                 # curly quotes are punctuation
        ("don’t", "dont"),                                    # curly apostrophe removed like "'"
        ("New\u00a0York", "new york"),                        # non-breaking space
        ("ＡＢＣ１２３", "abc123"),                              # full-width letters and digits
        ("Café Crème", "café crème"),                         # accented letters kept
        ("Cafe\u0301", "café"),                               # decomposed accent composes to the same letter
        ("¿Qué? ¡Sí!", "qué sí"),                             # Spanish inverted marks
        ("well—known «word»", "wellknown word"),              # em dash, guillemets
        ("Paris\u200b", "paris"),                             # zero-width space is invisible
        ("STRASSE", "strasse"),
        ("$5 + tax | ~", "5 tax"),                            # SQuAD's ASCII set includes symbols: $ + | ~
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


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


def test_word_count():
    assert word_count("  two\nwords ") == 2
    assert word_count("") == 0


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
