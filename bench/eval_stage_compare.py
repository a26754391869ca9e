"""The evaluate stage run once per generation method (bench/gpu_run.sh evalstage): wall times, generation figures,
metrics and the rows whose raw answers differ from the first method's, in one JSON.

    python -m bench.eval_stage_compare OUT_DIR plain auto
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RUN_KEYS = ("generation_requested", "generation", "weights", "batch_size", "max_new_tokens", "runtime_s",
            "generation_s", "new_tokens", "new_tokens_per_s", "device")
OVERALL_KEYS = ("n_rows", "exact_match", "f1", "stop_rate", "cut_by_limit_rate")


def compare(out: Path, methods: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {"command": "bash bench/gpu_run.sh OUT setup evalstage", "by_method": {}}
    raws: dict[str, list[str]] = {}
    for method in methods:
        metrics = json.loads((out / f"eval_stage_base_{method}.json").read_text())
        timing_file = out / f"eval_stage_base_{method}_timing.json"  # the stage writes timings apart from results
        run = {**metrics["run"], **(json.loads(timing_file.read_text()) if timing_file.is_file() else {})}
        wall = out / f"evalstage_wall_{method}.txt"
        raws[method] = [json.loads(line)["raw"] for line in (out / f"predictions_base_{method}.jsonl").open()]
        report["by_method"][method] = {
            "stage_wall_s": float(wall.read_text()) if wall.is_file() else None,
            **{key: run.get(key) for key in RUN_KEYS},
            **{key: metrics["overall"].get(key) for key in OVERALL_KEYS},
        }
    first, *others = methods
    for method in others:
        entry, base = report["by_method"][method], report["by_method"][first]
        entry["rows_differing_from_" + first] = sum(a != b for a, b in zip(raws[first], raws[method], strict=True))
        for key in ("stage_wall_s", "generation_s"):
            if entry.get(key) and base.get(key):
                entry[f"{key.removesuffix('_s')}_speedup_vs_{first}"] = round(base[key] / entry[key], 3)
    return report


def main() -> None:
    out, methods = Path(sys.argv[1]), sys.argv[2:]
    report = compare(out, methods)
    (out / "eval_stage_500.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
