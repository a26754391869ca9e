"""The real DVC pipeline on a tiny config: end to end, invalidation, experiments, and bad input."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.projects import make_project, tiny_params

pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(cwd), ALPACA_QLORA_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=check)


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", result.stdout + result.stderr))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_mistral_dir) -> Path:
    """A fresh git + DVC repository holding the project's files and a tiny params.yaml."""
    return make_project(tmp_path_factory.mktemp("project"), tiny_params(tiny_mistral_dir))


def test_end_to_end_then_no_op_then_only_downstream_of_a_change(project):
    first = dvc("repro", cwd=project)
    assert stages_run(first) == {"check_params", "fetch", "sample", "format", "train", "evaluate_base",
                                 "evaluate_finetuned", "compare", "package"}
    for out in ("data/raw/rows.jsonl", "data/formatted/train.jsonl", "models/adapter/adapter_model.safetensors",
                "models/adapter/README.md", "metrics/train.json", "metrics/eval_base.json",
                "metrics/eval_finetuned.json", "metrics/compare.json", "reports/compare.md"):
        assert (project / out).exists(), out
    assert json.loads((project / "metrics/sample.json").read_text())["eval_train_overlap"] == 0
    lora = yaml.safe_load((project / "params.yaml").read_text())["lora"]
    resolved = json.loads((project / "metrics/train.json").read_text())["lora_target_modules_resolved"]
    assert resolved == sorted(lora["target_modules"])
    stage_metrics = (("train", "train"), ("evaluate_base", "eval_base"), ("evaluate_finetuned", "eval_finetuned"))
    for stage, metrics in stage_metrics:
        timing = json.loads((project / f"metrics/timing/{stage}.json").read_text())
        assert "runtime_s" in timing  # machine-dependent figures live apart from the results
        assert "runtime_s" not in json.dumps(json.loads((project / f"metrics/{metrics}.json").read_text()))
    run_info = json.loads((project / "metrics/eval_base.json").read_text())["run"]
    assert run_info["numeric_path"]["compute_dtype"] == "float64"
    assert set(run_info["base_weights_sha256"]) >= {"model.safetensors", "tokenizer.json"}
    assert "exact_match_delta" in json.loads((project / "metrics/compare.json").read_text())["overall"]
    card = (project / "models/release/README.md").read_text()
    base_model = yaml.safe_load((project / "params.yaml").read_text())["model"]["name"]
    assert f"base_model: {base_model}\n" in card and "## Evaluation" in card and "library_name: peft" in card
    assert (project / "models/release/prompt_template.json").is_file()

    again = dvc("repro", cwd=project)
    assert stages_run(again) == set()
    assert "up to date" in dvc("status", cwd=project).stdout

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["sample_frac"] = 0.03
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc("status", cwd=project).stdout
    assert "sample:" in status and "fetch:" not in status
    changed = dvc("repro", cwd=project)
    # The eval split does not depend on sample_frac, so the base evaluation stays cached.
    assert stages_run(changed) == {"check_params", "sample", "format", "train", "evaluate_finetuned", "compare",
                                   "package"}


def test_a_lora_experiment_reruns_train_and_downstream_only(project):
    dvc("repro", cwd=project)
    run(["git", "add", "-A"], cwd=project)
    run(["git", "commit", "-qm", "baseline"], cwd=project)
    experiment = dvc("exp", "run", "-S", "lora.r=32", cwd=project)
    assert stages_run(experiment) == {"check_params", "train", "evaluate_finetuned", "compare", "package"}
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    assert "exact_match_delta" in json.dumps(shown)
    diff = dvc("metrics", "diff", "--all", cwd=project).stdout
    assert "exact_match" in diff


def test_bad_input_fails_clearly_and_writes_nothing(project, tmp_path):
    bad = project / "data" / "external" / "qa.json"
    bad.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    params_file = project / "params.yaml"
    saved = params_file.read_text()
    params = yaml.safe_load(saved)
    params["data"].update(source="local", path="data/external/qa.json")
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    rows_out = project / "data" / "raw" / "rows.jsonl"
    before = rows_out.read_bytes() if rows_out.exists() else None
    try:
        result = run([sys.executable, "stages/fetch.py"], cwd=project, check=False)
        assert result.returncode == 2
        assert "not Alpaca-shaped" in result.stderr and "columns found: answer, question" in result.stderr
        assert "Traceback" not in result.stderr
        assert (rows_out.read_bytes() if rows_out.exists() else None) == before

        params["data"].update(path="data/external/missing.json")
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        result = run([sys.executable, "stages/fetch.py"], cwd=project, check=False)
        assert result.returncode == 2 and "is not a file" in result.stderr

        params["data"].update(source="bundled", sample_frac=7)
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        result = run([sys.executable, "stages/sample.py"], cwd=project, check=False)
        assert result.returncode == 2 and "data.sample_frac = 7.0 is invalid" in result.stderr
    finally:
        params_file.write_text(saved)
        bad.unlink()


@pytest.mark.parametrize("section", ["data", "model", "lora", "train", "eval"])
def test_an_unknown_key_in_any_section_stops_the_pipeline(project, section):
    """No stage declares a misspelt key, so only a stage tracking the whole params file can notice it."""
    dvc("repro", cwd=project)
    run(["git", "add", "-A"], cwd=project)
    run(["git", "commit", "-qm", "up to date", "--allow-empty"], cwd=project)
    try:
        experiment = dvc("exp", "run", "-S", f"+{section}.smaple_frac=0.5", cwd=project, check=False)
        assert experiment.returncode != 0
        assert f"unknown key(s) {section}.smaple_frac" in experiment.stdout + experiment.stderr

        params = yaml.safe_load((project / "params.yaml").read_text())
        params[section]["smaple_frac"] = 0.5
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        edited = dvc("repro", cwd=project, check=False)
        assert edited.returncode != 0
        assert f"unknown key(s) {section}.smaple_frac" in edited.stdout + edited.stderr
    finally:
        run(["git", "checkout", "--", "params.yaml"], cwd=project)
    assert stages_run(dvc("repro", cwd=project)) == set()  # the failed check left dvc.lock as it was


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # never write through a link into DVC's cache
    path.write_bytes(data)


def test_no_stage_accepts_an_empty_input(project):
    dvc("repro", cwd=project)
    cases = [("sample.py", "data/raw/rows.jsonl"), ("format.py", "data/sampled/train.jsonl"),
             ("format.py", "data/sampled/eval.jsonl"), ("train.py", "data/formatted/train.jsonl"),
             ("evaluate.py base", "data/formatted/eval.jsonl"), ("compare.py", "data/predictions/finetuned.jsonl")]
    for script, input_path in cases:
        path = project / input_path
        saved = path.read_bytes()
        _replace(path, b"")
        try:
            result = run([sys.executable, *f"stages/{script}".split()], cwd=project, check=False)
        finally:
            _replace(path, saved)
        assert result.returncode == 2, (script, result.stderr)
        assert f"{input_path} has no rows" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert stages_run(dvc("repro", cwd=project)) == set()  # nothing was half-written


def test_a_max_seq_length_that_keeps_no_row_stops_format(project):
    dvc("repro", cwd=project)
    params_file = project / "params.yaml"
    saved = params_file.read_text()
    uncached = {name: (project / name).read_bytes() for name in ("metrics/format.json",
                                                                 "metrics/plots/token_lengths.json")}
    params = yaml.safe_load(saved)
    params["train"]["max_seq_length"] = 16
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run([sys.executable, "stages/format.py"], cwd=project, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert re.search(r"train.max_seq_length = 16 keeps none of the \d+ training rows: the shortest prompt is "
                         r"\d+ tokens", result.stderr), result.stderr
        suggested = int(re.search(r"at least (\d+)", result.stderr).group(1))
        params["train"]["max_seq_length"] = suggested
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        run([sys.executable, "stages/format.py"], cwd=project)
        assert json.loads((project / "metrics/format.json").read_text())["rows_kept"] >= 1
    finally:
        params_file.write_text(saved)
        dvc("checkout", "--force", cwd=project)
        for name, data in uncached.items():
            _replace(project / name, data)
    assert stages_run(dvc("repro", cwd=project)) == set()


def test_results_pushed_then_pulled_into_a_fresh_clone_rerun_nothing(project, tmp_path_factory):
    """A reviewer's path: push results to the default remote, clone, pull; nothing retrains, metrics unchanged.
    The default remote is a directory beside the clone, so a sibling clone shares it."""
    dvc("repro", cwd=project)
    run(["git", "add", "-A"], cwd=project)
    run(["git", "commit", "-qm", "results", "--allow-empty"], cwd=project)
    dvc("push", cwd=project)
    clone = tmp_path_factory.mktemp("clone")
    assert clone.parent == project.parent  # so `../../alpaca-qlora-dvc-remote` names the same directory
    run(["git", "clone", "-q", str(project), str(clone)], cwd=clone.parent)
    assert not (clone / "models" / "adapter").exists()
    dvc("pull", cwd=clone)
    for out in ("data/raw/rows.jsonl", "data/predictions/finetuned.jsonl", "models/adapter/adapter_model.safetensors"):
        assert (clone / out).read_bytes() == (project / out).read_bytes(), out
    assert stages_run(dvc("repro", cwd=clone)) == set()
    assert dvc("metrics", "diff", cwd=clone).stdout.strip() == ""

    # An experiment made in the clone travels through the git remote and the DVC remote to another clone.
    made = dvc("exp", "run", "-n", "shared-r8", "-S", "lora.r=8", cwd=clone)
    assert "train" in stages_run(made)
    dvc("exp", "push", "origin", "shared-r8", cwd=clone)
    other = tmp_path_factory.mktemp("other")
    run(["git", "clone", "-q", str(project), str(other)], cwd=other.parent)
    dvc("exp", "pull", "origin", "shared-r8", cwd=other)
    assert "shared-r8" in dvc("exp", "list", cwd=other).stdout
    dvc("exp", "apply", "shared-r8", cwd=other)
    adapter = "models/adapter/adapter_model.safetensors"
    assert (other / adapter).read_bytes() == (clone / adapter).read_bytes()
    assert yaml.safe_load((other / "params.yaml").read_text())["lora"]["r"] == 8
