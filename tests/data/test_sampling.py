import json
from collections import Counter

import pytest

from alpaca_qlora.data.records import prompt_key
from alpaca_qlora.data.sampling import SamplingError, proportional_allocation, split_rows


def make_rows(n: int = 400) -> list[dict]:
    task_types = ["factual"] * 5 + ["closed_qa"] * 3 + ["open_ended"] * 2
    return [
        {"id": f"{i:05d}", "instruction": f"Question {i}", "input": "", "output": str(i),
         "task_type": task_types[i % len(task_types)]}
        for i in range(n)
    ]


def test_same_seed_gives_identical_split_and_other_seed_differs():
    rows = make_rows()
    first = split_rows(rows, sample_frac=0.1, eval_size=50, seed=7)
    again = split_rows(list(reversed(rows)), sample_frac=0.1, eval_size=50, seed=7)
    other = split_rows(rows, sample_frac=0.1, eval_size=50, seed=8)
    dump = lambda split: json.dumps([split.train, split.eval])  # noqa: E731
    assert dump(first) == dump(again)
    assert dump(first) != dump(other)


def test_sizes_and_stratification():
    split = split_rows(make_rows(400), sample_frac=0.1, eval_size=50, seed=0)
    assert len(split.train) == 40
    assert len(split.eval) == 50
    assert Counter(row["task_type"] for row in split.eval) == {"factual": 25, "closed_qa": 15, "open_ended": 10}


def test_eval_split_does_not_move_when_sample_frac_changes():
    rows = make_rows()
    small = split_rows(rows, sample_frac=0.1, eval_size=50, seed=3)
    large = split_rows(rows, sample_frac=0.2, eval_size=50, seed=3)
    assert small.eval == large.eval
    assert len(large.train) == 80


def test_no_eval_row_shares_a_prompt_with_training():
    rows = make_rows(200)
    # Near-duplicates: same question modulo case/spacing, different ids and answers.
    rows += [dict(row, id=f"dup{row['id']}", instruction=row["instruction"].upper() + " ", output="x")
             for row in rows[:100]]
    split = split_rows(rows, sample_frac=0.5, eval_size=40, seed=1)
    train_keys = {prompt_key(row) for row in split.train}
    assert not any(prompt_key(row) in train_keys for row in split.eval)
    assert split.report["eval_train_overlap"] == 0
    assert split.report["excluded_as_eval_duplicates"] > 0


def test_rows_without_task_type_are_one_stratum():
    rows = [{"id": str(i), "instruction": f"q{i}", "input": "", "output": "a"} for i in range(30)]
    split = split_rows(rows, sample_frac=0.5, eval_size=10, seed=0)
    assert split.report["eval_rows_by_task_type"] == {"all": 10}


def test_eval_size_too_large_is_refused():
    with pytest.raises(SamplingError, match="data.eval_size = 30 leaves no rows"):
        split_rows(make_rows(30), sample_frac=0.1, eval_size=30, seed=0)


def test_proportional_allocation_sums_to_total():
    assert proportional_allocation({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}
    allocation = proportional_allocation({"a": 7, "b": 2, "c": 1}, 5)
    assert sum(allocation.values()) == 5 and allocation["a"] >= 3
