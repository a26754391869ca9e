from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from alpaca_qlora.data.bundled import generate_rows
from alpaca_qlora.data.records import clean_rows, prompt_key
from alpaca_qlora.data.sampling import SamplingError, proportional_allocation, split_rows
from support import ROOT
from support.alpaca_like import alpaca_like_rows, short_rule, with_ids
from support.params import write_embedded_params


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


def test_real_shaped_data_has_few_short_answers_and_the_split_draws_them_first():
    rows = with_ids(alpaca_like_rows(1000))
    available = sum(map(short_rule, rows))
    assert 30 <= available <= 80  # about 5%, as in alpaca-cleaned
    plain = split_rows(rows, sample_frac=0.1, eval_size=200, seed=42)
    assert sum(map(short_rule, plain.eval)) < 20  # the old stratified draw: EM would rest on about 10 rows
    split = split_rows(rows, sample_frac=0.1, eval_size=200, seed=42, min_short_answer=30, is_short=short_rule)
    assert len(split.eval) == 200
    assert sum(map(short_rule, split.eval)) >= 30
    assert split.report["eval_short_answer_rows"] == sum(map(short_rule, split.eval))
    assert split.report["short_answer_rows_available"] == available


def test_fewer_short_rows_than_wanted_takes_all_and_reports_it():
    rows = with_ids(alpaca_like_rows(1000))
    available = sum(map(short_rule, rows))
    split = split_rows(rows, sample_frac=0.1, eval_size=200, seed=42, min_short_answer=150, is_short=short_rule)
    assert split.report["eval_short_answer_rows"] == available < split.report["eval_short_answer_rows_wanted"] == 150
    assert len(split.eval) == 200


def test_short_rows_are_drawn_stratified_by_task_type_and_the_split_stays_seeded_and_frac_free():
    rows = with_ids([{"instruction": f"q{i}", "input": "", "task_type": task_type,
                      "output": "yes" if i % 4 else "a long answer of many more words than five"}
                     for i, task_type in enumerate(["factual"] * 300 + ["classification"] * 100 + ["open"] * 600)])
    kwargs = dict(eval_size=100, seed=5, min_short_answer=60, is_short=short_rule)
    split = split_rows(rows, sample_frac=0.1, **kwargs)
    short = Counter(row["task_type"] for row in split.eval if short_rule(row))
    assert sum(short.values()) >= 60
    assert short["factual"] >= 3 * short["classification"] - 3  # 225 : 75 short rows available
    assert split.eval == split_rows(rows, sample_frac=0.3, **kwargs).eval
    assert split.eval == split_rows(list(reversed(rows)), sample_frac=0.1, **kwargs).eval
    assert split.eval != split_rows(rows, sample_frac=0.1, **{**kwargs, "seed": 6}).eval


def test_data_with_enough_short_answers_keeps_its_natural_mix():
    # The bundled set is about 80% short-answer: a minimum of 150 of 200 must not crowd out its open-ended rows.
    rows = with_ids(generate_rows())
    plain = split_rows(rows, sample_frac=0.1, eval_size=200, seed=42)
    split = split_rows(rows, sample_frac=0.1, eval_size=200, seed=42, min_short_answer=150, is_short=short_rule)
    natural, drawn = plain.report["eval_rows_by_task_type"], split.report["eval_rows_by_task_type"]
    assert drawn["open_ended"] == natural["open_ended"]
    assert all(abs(drawn[name] - natural[name]) <= 1 for name in natural)  # rounding in two strata levels
    assert split.report["eval_short_answer_rows"] == sum(map(short_rule, plain.eval)) >= 150




def run_sample(tmp_path: Path, sample_frac: float) -> subprocess.CompletedProcess:
    raw = [{"instruction": f"What is {n} plus {n}?", "input": "", "output": str(2 * n)} for n in range(400)]
    rows, _ = clean_rows(raw)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_embedded_params(tmp_path / "params.yaml", data={"sample_frac": sample_frac, "eval_size": 20},
                          eval={"min_short_answer": 0})
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), ALPACA_QLORA_LOG_LEVEL="INFO")
    return subprocess.run([sys.executable, "stages/sample.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("sample_frac", "warned"), [(1e-6, True), (0.5, False)])
def test_a_sample_too_small_to_learn_from_is_warned_about(tmp_path, sample_frac, warned):
    result = run_sample(tmp_path, sample_frac)
    assert result.returncode == 0, result.stderr
    assert ("WARNING" in result.stderr and "data.sample_frac" in result.stderr) is warned, result.stderr
