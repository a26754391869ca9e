"""What every stage does around its own work: machine figures kept apart, empty inputs refused, user errors as a
clear exit."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from alpaca_qlora import io
from alpaca_qlora.errors import ConfigError, PipelineError
from alpaca_qlora.stage import EmptyInputError, read_input_rows, run_stage, split_timing, timing_path
from support import ROOT


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


OLD = {"run": "old"}
STAGE = {"stages": {"toy": {"cmd": "python toy.py", "deps": ["toy.py", "data/in.jsonl"],
                            "outs": [{"out/a.json": {"persist": True}}],
                            "metrics": [{"out/b.json": {"cache": False, "persist": True}}]},
                    "maker": {"cmd": "python maker.py", "outs": ["data/in.jsonl"]}}}


def toy_project(tmp_path: Path, body: str) -> Path:
    """A folder with a dvc.yaml, old outs, the toy stage's input, and toy.py running `body` as its main()."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(STAGE))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.jsonl").write_text('{"x": 1}\n')
    (tmp_path / "out").mkdir()
    for name in ("a.json", "b.json"):
        (tmp_path / "out" / name).write_text(json.dumps(OLD))
    script = ("import errno, os, signal, time\nfrom pathlib import Path\nfrom alpaca_qlora import io\n"
              "from alpaca_qlora.stage import run_stage\n\n\ndef main():\n" + textwrap.indent(body, "    ")
              + "\n\nrun_stage(main)\n")
    (tmp_path / "toy.py").write_text(script)
    return tmp_path


def run_toy(project: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ALPACA_QLORA_LOG_LEVEL="INFO")
    return subprocess.run([sys.executable, "toy.py"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=120)


def outs(project: Path) -> list:
    return [json.loads((project / "out" / name).read_text()) for name in ("a.json", "b.json")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_stage_says_so_in_one_line_and_keeps_its_previous_outs(tmp_path, signum):
    project = toy_project(tmp_path, f"io.write_json('out/a.json', {{'run': 'new'}})\n"
                                    f"os.kill(os.getpid(), {int(signum)})\ntime.sleep(30)")
    result = run_toy(project)
    assert result.returncode == 128 + signum, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert signal.Signals(signum).name in lines[0] and "previous outs are kept" in lines[0]
    assert "dvc repro" in lines[0]
    assert outs(project) == [OLD, OLD]
    assert sorted(path.name for path in (project / "out").iterdir()) == ["a.json", "b.json"]  # no scratch left


def test_the_train_stage_says_that_it_resumes_from_its_checkpoint(caplog):
    from alpaca_qlora.stage import run_stage

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_stage(interrupted, on_interrupt="training resumes from its last checkpoint (train.resume: auto)")
    assert exit_info.value.code == 128 + signal.SIGINT
    assert "training resumes from its last checkpoint (train.resume: auto)" in caplog.text
    train_script = (ROOT / "stages" / "train.py").read_text()
    assert "run_stage(main, on_interrupt=" in train_script and "train.resume: auto" in train_script


def test_a_full_disk_leaves_every_out_old_and_names_the_problem(tmp_path):
    body = ("io.write_json('out/a.json', {'run': 'new'})\n"
            "with io.atomic_path('out/b.json') as tmp:\n"
            "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))")
    result = run_toy(toy_project(tmp_path, body))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "disk is full" in result.stderr and "previous outs are kept" in result.stderr
    assert outs(tmp_path) == [OLD, OLD]


def test_a_failed_stage_replaces_no_out(tmp_path):
    body = ("io.write_json('out/a.json', {'run': 'new'})\n"
            "from alpaca_qlora.errors import PipelineError\nraise PipelineError('bad input: fix it')")
    result = run_toy(toy_project(tmp_path, body))
    assert result.returncode == 2 and "bad input: fix it" in result.stderr
    assert outs(tmp_path) == [OLD, OLD]


def test_a_stage_that_succeeds_replaces_all_its_outs(tmp_path):
    body = "io.write_json('out/a.json', {'run': 'new'})\nio.write_json('out/b.json', {'run': 'new'})"
    result = run_toy(toy_project(tmp_path, body))
    assert result.returncode == 0, result.stderr
    assert outs(tmp_path) == [{"run": "new"}, {"run": "new"}]


def test_a_folder_where_an_out_file_goes_is_named_and_nothing_is_replaced(tmp_path):
    project = toy_project(tmp_path, "io.write_json('out/a.json', {'run': 'new'})\n"
                                    "io.write_json('out/b.json', {'run': 'new'})")
    (project / "out" / "b.json").unlink()
    (project / "out" / "b.json" / "x").mkdir(parents=True)
    result = run_toy(project)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "out/b.json" in result.stderr and "a folder stands where a file goes" in result.stderr
    assert json.loads((project / "out" / "a.json").read_text()) == OLD


def test_a_file_where_the_checkpoints_folder_goes_is_named(tmp_path):
    body = "from alpaca_qlora.training.checkpoints import lock_checkpoints\nlock_checkpoints(Path('checkpoints'))"
    project = toy_project(tmp_path, body)
    (project / "checkpoints").write_text("x\n")
    result = run_toy(project)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "checkpoints" in result.stderr and "a file stands where a folder goes" in result.stderr


def test_a_missing_input_names_the_stage_that_makes_it(tmp_path):
    project = toy_project(tmp_path, "raise AssertionError('main ran without its input')")
    (project / "data" / "in.jsonl").unlink()
    result = run_toy(project)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "data/in.jsonl" in result.stderr and "`dvc repro maker`" in result.stderr


def test_read_input_rows_names_the_stage_that_makes_a_missing_file(tmp_path):
    from alpaca_qlora.errors import PipelineError
    from alpaca_qlora.stage import read_input_rows

    with pytest.raises(PipelineError, match=r"dvc repro fetch"):
        read_input_rows(tmp_path / "rows.jsonl", "fetch")


def test_every_out_in_dvc_yaml_is_kept_by_dvc_while_its_stage_runs():
    """Without `persist`, DVC deletes a stage's outs before running it: an interrupted run would lose them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    not_kept = [(name, out) for name, stage in stages.items() for kind in ("outs", "metrics", "plots")
                for out in stage.get(kind, []) if not (isinstance(out, dict) and next(iter(out.values()))
                                                       .get("persist") is True)]
    assert not not_kept


def test_a_stage_run_outside_the_venv_says_to_activate_it():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-S", "stages/check_params.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "source .venv/bin/activate" in result.stderr and "make repro" in result.stderr


def test_oserror_numbers_outside_the_file_system_still_raise():
    from alpaca_qlora.stage import run_stage

    def broken() -> None:
        raise OSError(errno.ECONNRESET, "connection reset")

    with pytest.raises(OSError):
        run_stage(broken)


def test_a_command_that_is_not_a_stage_says_how_to_go_on_with_it(tmp_path):
    """Its own advice, not `dvc repro` (it is no stage), even in a folder whose dvc.yaml has stages."""
    project = toy_project(tmp_path, "pass")
    (project / "tool.py").write_text(
        "import os, signal, time\nfrom alpaca_qlora.stage import run_command\n\n\ndef main():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n\n\n"
        "run_command(main, name='the sweep', on_interrupt='the rest stay queued')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "tool.py"], cwd=project, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith("the sweep was interrupted (SIGTERM): the rest stay queued."), lines
    assert outs(project) == [OLD, OLD]


def test_a_command_exits_with_status_two_and_one_line_on_a_user_error(caplog):
    from alpaca_qlora.stage import run_command

    def main() -> None:
        raise PipelineError("no such revision: set BASE")

    with caplog.at_level(logging.ERROR, logger="alpaca_qlora"), pytest.raises(SystemExit) as exit_:
        run_command(main, name="the review", on_interrupt="run it again")
    assert exit_.value.code == 2 and "no such revision: set BASE" in caplog.text


@pytest.mark.parametrize("module", ["alpaca_qlora.sweep", "alpaca_qlora.evaluation.review",
                                    "alpaca_qlora.evaluation.compare_revisions", "alpaca_qlora.infer"])
def test_ctrl_c_in_a_command_gives_its_own_advice_not_dvc_repro(module):
    """Each command's main() parses its arguments first: Ctrl-C arrives there."""
    driver = ("import argparse, runpy\n"
              "def interrupted(*args, **kwargs):\n    raise KeyboardInterrupt\n"
              "argparse.ArgumentParser.parse_args = interrupted\n"
              f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 128 + signal.SIGINT, result.stderr
    lines = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(lines) == 1 and "was interrupted (SIGINT)" in lines[0], result.stderr
    assert "dvc repro" not in result.stderr and "Traceback" not in result.stderr
