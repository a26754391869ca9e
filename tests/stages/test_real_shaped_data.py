"""Issue 11, section 4: on real-shaped Alpaca data the evaluation measures the model, not the token limit.

The stages on data shaped like alpaca-cleaned: the sample stage warns when EM would rest on too few short-answer
rows, and a local real-format file goes through fetch, sample, format and evaluate with the limit's cuts recorded.
The parts are tested by module: the split in tests/data/test_sampling.py, the token limit in
tests/data/test_formatting.py, the cut rate and the proxies in tests/evaluation/test_metrics.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import ROOT
from support.alpaca_like import alpaca_like_rows, short_rule, with_ids, write_alpaca_like


def sample_project(tmp_path: Path, rows, **eval_params) -> Path:
    tmp_path.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"].update(eval_params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


def run_sample(project: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ALPACA_QLORA_LOG_LEVEL="INFO")
    return subprocess.run([sys.executable, str(ROOT / "stages" / "sample.py")], cwd=project, env=env,
                          capture_output=True, text=True, check=True)


def test_sample_stage_warns_when_the_source_has_too_few_short_answers(tmp_path):
    rows = with_ids(alpaca_like_rows(1000))
    few = run_sample(sample_project(tmp_path / "few", rows, min_short_answer=150))
    report = json.loads((tmp_path / "few" / "metrics" / "sample.json").read_text())
    assert "WARNING" in few.stderr and "exact match will rest on only" in few.stderr
    assert report["eval_short_answer_rows"] == sum(map(short_rule, rows)) < 150
    enough = run_sample(sample_project(tmp_path / "enough", rows, min_short_answer=30))
    assert "WARNING" not in enough.stderr
    assert json.loads((tmp_path / "enough" / "metrics" / "sample.json").read_text())["eval_short_answer_rows"] >= 30


@pytest.mark.slow
def test_local_real_format_file_through_sample_format_and_evaluate(tmp_path, tiny_mistral_dir):
    """The random tiny model never emits EOS, so every answer runs into the limit: the cut rate must say so."""
    project = tmp_path / "project"
    write_alpaca_like(project / "data" / "external" / "alpaca_like.json", 400)
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="local", path="data/external/alpaca_like.json", eval_size=16)
    params["model"].update(name=str(tiny_mistral_dir), quantization="none")
    params["eval"].update(max_new_tokens="auto", max_new_tokens_cap=12, min_short_answer=6, batch_size=8)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", ALPACA_QLORA_LOG_LEVEL="INFO")
    logs = ""
    for stage in ("fetch", "sample", "format", "evaluate"):
        arguments = ["base"] if stage == "evaluate" else []
        result = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *arguments], cwd=project,
                                env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        logs += result.stderr
    eval_rows = [json.loads(line) for line in (project / "data" / "formatted" / "eval.jsonl").read_text().splitlines()]
    assert all(row["reference_tokens"] > 0 for row in eval_rows)
    metrics = json.loads((project / "metrics" / "eval_base.json").read_text())
    run, overall = metrics["run"], metrics["overall"]
    assert run["max_new_tokens_requested"] == "auto" and run["max_new_tokens"] == 12  # capped
    assert run["covering_99pct"] > 12 and run["references_over_limit"] > 0.5
    assert "cuts" in logs and "of the references short" in logs  # a capped limit is never silent
    assert overall["n_short_answer"] >= 6
    assert overall["cut_by_limit_rate"] == 1.0
    predictions = [json.loads(line)
                   for line in (project / "data" / "predictions" / "base.jsonl").read_text().splitlines()]
    assert all(row["cut_by_limit"] and row["new_tokens"] == 12 for row in predictions)
    assert all("unsupported_word_share" in row and "label_adherence" in row for row in predictions)
