"""The sure-model agreement bench end to end at tiny size on CPU: train, save, load as the evaluate stage does (NF4
+ adapter), answer with every generation path, score with the project's metrics."""
from __future__ import annotations

import json

import pytest

from bench.sure_model import PATHS, TINY, run


@pytest.mark.slow
def test_sure_model_bench_runs_end_to_end_on_cpu(tmp_path):
    payload = run(tmp_path / "sure.json", TINY, "cpu", [name for name, *_ in PATHS], tmp_path / "work")
    assert json.loads((tmp_path / "sure.json").read_text()) == payload
    model = payload["model"]
    assert model["base"]["train_loss"] < 8.0  # learned from ln(32000) = 10.4: the loop trains
    assert (tmp_path / "work" / "adapter" / "adapter_model.safetensors").is_file()
    report = payload["agreement_on_sure_model"]
    assert list(report["by_path"]) == [name for name, *_ in PATHS]
    assert report["rows"] == {"eval": TINY.eval_rows, "seen": TINY.seen_rows}
    for name, figures in report["by_path"].items():
        for rows in ("eval", "seen"):
            assert {"exact_match", "f1", "identical_share", "new_tokens_per_s"} <= set(figures[rows])
        if not name.startswith("merged_bf16"):  # CPU's float64 path: every unmerged path gives plain's tokens
            assert figures["eval"]["identical_share"] == figures["seen"]["identical_share"] == 1.0
            assert figures["eval"]["f1"] == report["by_path"]["plain"]["eval"]["f1"]
    assert report["by_path"]["graphed"]["meets_goal"] is True
