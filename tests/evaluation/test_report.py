import random

from alpaca_qlora.evaluation.metrics import aggregate, metric_deltas, score_row
from alpaca_qlora.evaluation.report import plot_rows, prompt_excerpt, render_report, select_examples, table_cell

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def prediction(row_id, answer, reference, task_type="factual", short=True):
    return {"id": row_id, "task_type": task_type,
            "prompt": f"{PREAMBLE}\n\n### Instruction:\nQuestion {row_id}?\n\n### Response:\n",
            "reference": reference, "answer": answer, "short_answer": short, "stopped_by_eos": True,
            **score_row(answer, reference, short_answer=short)}


# Per row, fine-tuned minus base (EM, F1, key-fact recall): 1 -> (+1, +0.6, 0), 2 -> (-1, -1, -1),
# 3 -> (+1, +1, +1), 4 -> (+1, +0.6, 0) (ties with 1), 5 -> (0, +0.13, +0.5), 6 -> unchanged,
# 7 -> (-1, -0.33, -0.5), 8 -> (-1, -1, -1) (ties with 2).
BASE = [
    prediction("1", "It is Na, sodium", "Na"),
    prediction("2", "K", "K"),
    prediction("3", "no", "Fe"),
    prediction("4", "Au | gold metal ok", "Au"),
    prediction("5", "red", "red wine", task_type="open_qa", short=False),
    prediction("6", "same", "same"),
    prediction("7", "white wine", "white wine", task_type="open_qa", short=False),
    prediction("8", "Ca", "Ca"),
]
TUNED = [
    prediction("1", "Na", "Na"),
    prediction("2", "potassium", "K"),
    prediction("3", "Fe", "Fe"),
    prediction("4", "Au", "Au"),
    prediction("5", "red wine, dry", "red wine", task_type="open_qa", short=False),
    prediction("6", "same", "same"),
    prediction("7", "white", "white wine", task_type="open_qa", short=False),
    prediction("8", "calcium", "Ca"),
]


def test_wins_rank_by_exact_match_then_f1_with_ties_broken_by_id():
    examples = select_examples(BASE, TUNED, 10)
    assert [item["id"] for item in examples["wins"]] == ["3", "1", "4", "5"]  # 1 and 4 tie: smaller id first
    assert [item["id"] for item in examples["losses"]] == ["2", "8", "7"]  # unchanged row 6 is neither
    first = examples["wins"][0]
    assert first["base_answer"] == "no" and first["finetuned_answer"] == "Fe" and first["reference"] == "Fe"
    assert first["delta"]["exact_match"] == 1.0


def test_example_selection_ignores_row_order_and_respects_k():
    examples = select_examples(BASE, TUNED, 2)
    assert [item["id"] for item in examples["wins"]] == ["3", "1"]
    shuffled_base, shuffled_tuned = BASE[:], TUNED[:]
    random.Random(0).shuffle(shuffled_base)
    random.Random(1).shuffle(shuffled_tuned)
    assert select_examples(shuffled_base, shuffled_tuned, 2) == examples
    assert select_examples(BASE, TUNED, 0) == {"wins": [], "losses": []}


def test_rows_missing_from_one_side_are_skipped():
    examples = select_examples(BASE[:2], TUNED, 10)
    assert {item["id"] for item in examples["wins"] + examples["losses"]} == {"1", "2"}


def make_report(examples=None):
    base, tuned = aggregate(BASE), aggregate(TUNED)
    examples = select_examples(BASE, TUNED, 3) if examples is None else examples
    return render_report(base, tuned, metric_deltas(base, tuned), examples,
                         title_context={"base model": "tiny-model", "adapter": "models/adapter", "quantized": False})


def test_report_has_context_and_metric_tables():
    report = make_report()
    assert "- **base model**: tiny-model" in report and "- **adapter**: models/adapter" in report
    # EM over the 6 short-answer rows: base 3/6 (2, 6, 8), fine-tuned 4/6 (1, 3, 4, 6)
    assert "| exact_match | 0.5000 | 0.6667 | +0.1667 |" in report
    assert "| n_rows | 8 | 8 | |" in report
    assert "| factual | 6 | 6 | 0.5000 | 0.6667 | +0.1667 |" in report
    assert "| open_qa | 2 | 0 | n/a | n/a | n/a |" in report  # no short-answer rows: no EM, not 0


def test_report_shows_wins_and_losses_side_by_side():
    report = make_report()
    wins, losses = report.split("## Largest wins")[1].split("## Largest losses")
    assert "| prompt | ### Instruction:<br>Question 3? |" in wins  # no preamble, no empty response header
    assert PREAMBLE not in report
    assert "| base answer | no |" in wins and "| fine-tuned answer | Fe |" in wins
    assert "| base answer | Au \\| gold metal ok |" in wins  # a pipe inside a cell is escaped
    assert "| fine-tuned answer | potassium |" in losses and "| reference | K |" in losses


def test_report_says_when_there_are_no_examples():
    assert make_report({"wins": [], "losses": []}).count("None: no row changed") == 2


def test_table_cells_stay_one_cell_and_short():
    assert table_cell("a | b\nc <b>") == "a \\| b<br>c &lt;b&gt;"
    long = table_cell("word " * 500, limit=100)
    assert len(long) < 130 and long.endswith("chars)") and "…" in long
    assert table_cell("   ") == "*(empty)*"


def test_prompt_excerpt_without_template_is_unchanged():
    assert prompt_excerpt("Just a question?") == "Just a question?"


def test_plot_rows():
    base, tuned = aggregate(BASE), aggregate(TUNED)
    plots = plot_rows(base, tuned, BASE, TUNED)
    assert plots["em_by_task_type"] == [  # open_qa has no short-answer rows, so no EM bar
        {"task_type": "factual", "model": "base", "exact_match": 0.5},
        {"task_type": "factual", "model": "finetuned", "exact_match": 0.666667},
    ]
    lengths = plots["answer_lengths"]
    assert len(lengths) == 16
    assert {"id": "1", "model": "base", "answer_words": 4} in lengths
    assert {"id": "1", "model": "finetuned", "answer_words": 1} in lengths


def test_exact_match_is_shown_and_ranked_only_where_it_is_counted():
    # A long-answer row whose fine-tuned answer happens to equal the reference: EM is not counted there, so it
    # must neither rank the row above a short-answer EM gain nor show as "exact_match +1" in the report.
    long_base = prediction("9", "Rome is old and very large", "Rome is old", task_type="open_qa", short=False)
    long_tuned = prediction("9", "Rome is old", "Rome is old", task_type="open_qa", short=False)
    short_base, short_tuned = prediction("3", "no", "Fe"), prediction("3", "Fe", "Fe")
    wins = select_examples([long_base, short_base], [long_tuned, short_tuned], 5)["wins"]
    assert [item["id"] for item in wins] == ["3", "9"]
    assert wins[0]["delta"]["exact_match"] == 1.0
    assert "exact_match" not in wins[1]["delta"] and wins[1]["delta"]["f1"] > 0
    base, tuned = aggregate([long_base, short_base]), aggregate([long_tuned, short_tuned])
    report = render_report(base, tuned, metric_deltas(base, tuned), {"wins": wins, "losses": []},
                           title_context={})
    assert "`9` (open_qa): f1 +" in report and "`9` (open_qa): exact_match" not in report


def test_report_says_what_em_rests_on_and_how_often_the_limit_cut():
    base, tuned = aggregate(BASE), aggregate(TUNED)
    for metrics, cut in ((base, 0.5), (tuned, 0.125)):
        metrics["overall"]["cut_by_limit_rate"] = cut
        metrics["run"] = {"max_new_tokens": 97, "max_new_tokens_requested": "auto", "references_over_limit": 0.01}
    report = render_report(base, tuned, metric_deltas(base, tuned), {"wins": [], "losses": []}, title_context={})
    assert "exact match rests on** 6 short-answer rows of 8" in report
    assert "**token limit** 97 new tokens (eval.max_new_tokens: auto" in report
    assert "answers cut by it: base 0.5000, fine-tuned 0.1250" in report
    for name in ("cut_by_limit_rate", "unsupported_word_share", "label_adherence"):
        assert f"| {name} |" in report
