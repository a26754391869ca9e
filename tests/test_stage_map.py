"""Which dvc.yaml stage a command line runs, however the script's path is written."""
from __future__ import annotations

import yaml

from alpaca_qlora.stage_map import stage_map

DVC = {"stages": {"train": {"cmd": "python stages/train.py", "deps": ["stages/train.py", "data/train.jsonl"],
                            "outs": ["models/adapter"], "metrics": [{"metrics/train.json": {"cache": False}}]},
                  "format": {"cmd": "python stages/format.py", "outs": ["data/train.jsonl"]},
                  "evaluate_base": {"cmd": "python stages/evaluate.py base", "outs": ["data/base.jsonl"]},
                  "evaluate_finetuned": {"cmd": "python stages/evaluate.py finetuned", "outs": ["data/ft.jsonl"]}}}


def test_a_launcher_that_passes_the_scripts_absolute_path_runs_the_same_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC))
    for argv in (["stages/train.py"], [str(tmp_path / "stages" / "train.py")], ["./stages/../stages/train.py"]):
        found = stage_map(argv)
        assert found.names == ("train",), argv
        assert found.outs == ("models/adapter", "metrics/train.json")
        assert found.inputs == {"data/train.jsonl": "format"}


def test_arguments_pick_the_stage_and_a_script_without_them_runs_every_stage_of_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC))
    assert stage_map([str(tmp_path / "stages" / "evaluate.py"), "base"]).names == ("evaluate_base",)
    assert stage_map(["stages/evaluate.py"]).names == ("evaluate_base", "evaluate_finetuned")
    assert stage_map(["stages/other.py"]).names == ()


def test_a_stage_run_parses_dvc_yaml_once_and_a_new_version_again(tmp_path, monkeypatch):
    """The stage runner (its outs and inputs) and the stage (its declared params) read one parse."""
    from alpaca_qlora import stage_map as module
    from alpaca_qlora.stage_params import declared_params

    monkeypatch.chdir(tmp_path)
    spec = {"stages": {**DVC["stages"], "format": {**DVC["stages"]["format"], "params": ["data.seed"]}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec))
    parsed = []
    monkeypatch.setattr(module.yaml, "safe_load", lambda text: parsed.append(text) or yaml.load(text, yaml.SafeLoader))
    assert stage_map(["stages/format.py"]).names == ("format",)
    assert declared_params("format") == ("data.seed",)
    assert len(parsed) == 1
    spec["stages"]["format"]["params"] = ["data.seed", "data.template"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec))
    assert declared_params("format") == ("data.seed", "data.template")
    assert len(parsed) == 2
