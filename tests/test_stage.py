"""What every stage does around its own work: machine figures kept apart, empty inputs refused, user errors as a
clear exit."""
from __future__ import annotations

import logging

import pytest

from alpaca_qlora import io
from alpaca_qlora.errors import ConfigError, PipelineError
from alpaca_qlora.stage import EmptyInputError, read_input_rows, run_stage, split_timing, timing_path


def test_timing_figures_leave_the_results_and_go_to_their_own_file():
    results, timing = split_timing({"train_loss": 1.4, "runtime_s": 12.5, "resumed_from_step": 4, "steps": 20})
    assert results == {"train_loss": 1.4, "steps": 20}
    assert timing == {"runtime_s": 12.5, "resumed_from_step": 4}
    assert timing_path("train").as_posix() == "metrics/timing/train.json"


def test_an_empty_input_names_the_file_and_the_stage_to_rerun(tmp_path):
    path = tmp_path / "train.jsonl"
    io.write_jsonl(path, [])
    with pytest.raises(EmptyInputError, match=r"train\.jsonl has no rows: rerun `dvc repro format`"):
        read_input_rows(path, "format")
    io.write_jsonl(path, [{"id": "a"}])
    assert read_input_rows(path, "format") == [{"id": "a"}]


@pytest.mark.parametrize("error", [PipelineError("no rows: rerun `dvc repro sample`"),
                                   ConfigError("params: lora.r = 0 must be at least 1.")],
                         ids=["pipeline", "config"])
def test_a_user_error_exits_with_status_two_and_its_message(error, caplog):
    def main():
        raise error

    with caplog.at_level(logging.ERROR, logger="alpaca_qlora"), pytest.raises(SystemExit) as exit_:
        run_stage(main)
    assert exit_.value.code == 2
    assert str(error) in caplog.text


def test_a_bug_is_not_hidden_as_a_user_error():
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_stage(main)
