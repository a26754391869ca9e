"""The evaluate stage's CPU generation, old method against new, on real-format Alpaca rows (issue 24, embedded demo).

    python -m bench.cpu_eval_bench /tmp/alpaca-like --rows 100           # builds the project there when missing
    python -m bench.cpu_eval_bench . --rows 200 --which finetuned        # this checkout's eval rows and adapter

The project is a folder the stages run in: when it has no formatted eval rows, the 1k-row Alpaca-format stand-in
(support/alpaca_like.py) goes through the fetch, sample and format stages there. Both methods load the model through
the stage's own functions (float64 on CPU), take the stage's token limit over all eval rows, and answer the first
`--rows` prompts, alternating old and new in one process so that a busy machine slows both alike. Every run's
(raw, stopped_by_eos, new_tokens) per row must equal the first run's.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from alpaca_qlora import io
from support.alpaca_like import write_alpaca_like
from support.stages import stage_script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STAND_IN_ROWS = 1000
log = logging.getLogger("cpu_eval_bench")


def prepare(project: Path) -> None:
    """The stand-in file as a local data source, through fetch, sample and format with the project's params."""
    write_alpaca_like(project / "data" / "external" / "alpaca_like.json", STAND_IN_ROWS)
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="local", path="data/external/alpaca_like.json")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    for stage in ("fetch", "sample", "format"):
        log.info("%s: stages/%s.py", project, stage)
        subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=project, env=env, check=True)


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu_model": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": [round(value, 2) for value in os.getloadavg()],
            "torch": torch.__version__}


def timed_runs(stage: Any, rows: list[dict[str, Any]], params: Any, loaded: dict[str, tuple], methods: dict[str, str],
               batch_sizes: dict[str, int], max_new_tokens: int,
               repeats: int) -> tuple[dict[str, dict[str, Any]], dict[str, list[tuple]]]:
    """Old and new answer in turn, `repeats` times, each with its model as the stage loaded it."""
    figures: dict[str, dict[str, Any]] = {label: {"requested": methods[label], "method": loaded[label][1],
                                                  "weights": loaded[label][2], "batch_size": batch_sizes[label],
                                                  "wall_s": []} for label in methods}
    answers: dict[str, list[tuple]] = {}
    for repeat in range(repeats):
        for label, (model, method, _) in loaded.items():
            started = time.perf_counter()
            generations, stats = stage.answer(rows, model, params, method=method, max_new_tokens=max_new_tokens,
                                              batch_size=batch_sizes[label], progress=False)
            wall = time.perf_counter() - started
            figures[label]["wall_s"].append(round(wall, 2))
            figures[label]["new_tokens"] = stats["new_tokens"]
            answers[f"{label}#{repeat}"] = [(g.raw, g.stopped_by_eos, g.new_tokens) for g in generations]
            log.info("%s (%s) run %d: %.1f s, %d new tokens", label, method, repeat + 1, wall, stats["new_tokens"])
    for entry in figures.values():
        entry["wall_s_median"] = round(statistics.median(entry["wall_s"]), 2)
        entry["new_tokens_per_s"] = round(entry["new_tokens"] / entry["wall_s_median"], 2)
    return figures, answers


def bench(project: Path, *, rows: int, which: str, old: str, new: str, old_batch_size: int | None,
          repeats: int) -> dict[str, Any]:
    if not (project / "data" / "formatted" / "eval.jsonl").is_file():
        prepare(project)
    stage = stage_script("evaluate")
    os.chdir(project)  # the stage reads params.yaml, dvc.yaml, its input rows and the adapter from here
    params = stage.stage_params(f"evaluate_{which}")
    eval_rows = stage.read_eval_rows()
    before = machine()
    methods = {"old": old, "new": new}
    loaded = {label: stage.load_for_eval(which, params, generation) for label, generation in methods.items()}
    limit = stage.generation_limit(eval_rows, loaded["old"][0], params)
    batch_sizes = {"old": old_batch_size or params.eval.batch_size, "new": params.eval.batch_size}
    figures, answers = timed_runs(stage, eval_rows[:rows], params, loaded, methods, batch_sizes,
                                  limit["max_new_tokens"], repeats)
    reference = next(iter(answers.values()))
    differing = {key: sum(a != b for a, b in zip(reference, value, strict=True)) for key, value in answers.items()}
    return {
        "what": "the evaluate stage's generation on CPU (float64), old method vs new (bench/cpu_eval_bench.py)",
        "command": "python -m bench.cpu_eval_bench " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "project_rows": "bundled eval rows" if project.resolve() == ROOT else
                        f"{STAND_IN_ROWS}-row Alpaca-format stand-in (support/alpaca_like.py)",
        "which": which, "rows": len(eval_rows[:rows]),
        "max_new_tokens": limit["max_new_tokens"], "repeats": repeats,
        "machine_before": before, "machine_after": machine(),
        "old": figures["old"], "new": figures["new"],
        "speedup": round(figures["old"]["wall_s_median"] / figures["new"]["wall_s_median"], 3),
        "new_wall_share_of_old": round(figures["new"]["wall_s_median"] / figures["old"]["wall_s_median"], 3),
        "rows_differing_from_first_run": differing,
        "rows_identical": all(count == 0 for count in differing.values()),
    }


def table(report: dict[str, Any]) -> str:
    load = [report[key]["load_average_1_5_15"] for key in ("machine_before", "machine_after")]
    lines = [f"{report['which']}, {report['rows']} rows, limit {report['max_new_tokens']} tokens, load (1, 5, 15 min) "
             f"before {load[0]}, after {load[1]}",
             "| path | generation | batch | wall s (median) | runs | new tokens | new tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label in ("old", "new"):
        entry = report[label]
        lines.append(f"| {label} | {entry['method']} ({entry['requested']}) | {entry['batch_size']} | "
                     f"{entry['wall_s_median']} | {entry['wall_s']} | {entry['new_tokens']} | "
                     f"{entry['new_tokens_per_s']} |")
    lines.append(f"new/old wall {report['new_wall_share_of_old']} (speedup {report['speedup']}x); rows identical: "
                 f"{report['rows_identical']}")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path, help="folder the stages run in (built with the stand-in if empty)")
    parser.add_argument("--rows", type=int, default=100, help="eval rows answered (the first ones)")
    parser.add_argument("--which", choices=("base", "finetuned"), default="base")
    parser.add_argument("--old", default="plain", help="eval.generation of the old path")
    parser.add_argument("--new", default="auto", help="eval.generation of the new path")
    parser.add_argument("--old-batch-size", type=int, help="batch size of the old path (default: eval.batch_size)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_eval_bench.json")
    args = parser.parse_args()
    out = args.out.resolve()
    report = bench(args.project.resolve(), rows=args.rows, which=args.which, old=args.old, new=args.new,
                   old_batch_size=args.old_batch_size, repeats=args.repeats)
    io.write_json(out, report)
    print(table(report))  # the bench's output
    log.info("written to %s", out)


if __name__ == "__main__":
    main()
