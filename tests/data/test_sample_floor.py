"""The sample stage warns when data.sample_frac leaves too few training rows to learn from."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alpaca_qlora.data.records import clean_rows
from support.params import write_embedded_params

ROOT = Path(__file__).resolve().parents[2]


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
