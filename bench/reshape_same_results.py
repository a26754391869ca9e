"""Same results before and after a code change: one short embedded training in each of two checkouts, compared.

Each checkout (a `git worktree` at the commit to test) runs fetch, sample, format and train as its own stage
scripts, with a few params held equal where the checkouts differ for reasons other than the change under test
(packing off, a fixed micro batch, no short-answer minimum in the eval split), a few steps and a loss logged every
step. Each side writes a record: its commit, the sha256 of the data files and of the adapter weights, and the
per-step losses from its DVCLive curve. `compare` puts two records side by side.

The eval split's drawing changed in the same period too (short-answer rows stratified apart), so the two checkouts
sample different rows from the same fetched set. `--sampled-from` hands one checkout the other's sampled rows after
its own sample stage (whose hashes are recorded as well): format and train then see the same rows on both sides.

    python -m bench.reshape_same_results run /tmp/pre-reshape --record /tmp/before.json
    python -m bench.reshape_same_results run /tmp/post-reshape --sampled-from /tmp/pre-reshape --record /tmp/after.json
    python -m bench.reshape_same_results compare /tmp/before.json /tmp/after.json \
        --out bench/results/reshape_same_results.json
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from alpaca_qlora import io

log = logging.getLogger("reshape_same_results")

STAGES = ("fetch", "sample", "format", "train")
SAMPLED_FILES = ("data/sampled/train.jsonl", "data/sampled/eval.jsonl")
DATA_FILES = ("data/raw/rows.jsonl", *SAMPLED_FILES, "data/formatted/train.jsonl", "data/formatted/eval.jsonl")
ADAPTER_WEIGHTS = "models/adapter/adapter_model.safetensors"
LOSS_CURVE = "metrics/train_log/plots/metrics/train/loss.tsv"
# Held equal on both sides: the row-packing algorithm (greedy bins before, best-fit-decreasing after) and the eval
# split's short-answer minimum (absent before) changed in the same period as the reshape, so they are taken out.
OVERRIDES = {
    "train": {"packing": False, "micro_batch_size": 8, "gradient_accumulation_steps": 1, "logging_steps": 1,
              "save_steps": 1000, "resume": "never", "dvclive": True},
    "eval": {"min_short_answer": 0},
}


def sha256(path: Path) -> str | None:
    return io.sha256_file(path) if path.is_file() else None


def column_sha256(path: Path) -> dict[str, str]:
    """A hash per field over all rows, so files that differ only by fields one side added still compare."""
    rows = io.read_jsonl(path)
    names = sorted({name for row in rows for name in row})
    return {name: hashlib.sha256(json.dumps([row.get(name) for row in rows]).encode()).hexdigest() for name in names}


def apply_overrides(checkout: Path, max_steps: int) -> dict[str, Any]:
    """Set the overrides that the checkout's params.yaml knows; a key it lacks is reported, never added."""
    params_file = checkout / "params.yaml"
    params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    wanted = {section: dict(values) for section, values in OVERRIDES.items()}
    wanted["train"]["max_steps"] = max_steps
    applied, absent = {}, []
    for section, values in wanted.items():
        for name, value in values.items():
            if name in params.get(section, {}):
                params[section][name] = value
                applied[f"{section}.{name}"] = value
            else:
                absent.append(f"{section}.{name}")
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return {"applied": applied, "absent_in_this_checkout": absent}


def read_losses(checkout: Path) -> list[tuple[int, float]]:
    with (checkout / LOSS_CURVE).open(encoding="utf-8") as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle, delimiter="\t")]


def run_side(checkout: Path, max_steps: int, sampled_from: Path | None = None) -> dict[str, Any]:
    checkout = checkout.resolve()
    overrides = apply_overrides(checkout, max_steps)
    environment = {**os.environ, "PYTHONPATH": str(checkout)}
    seconds, own_sample = {}, None
    for stage in STAGES:
        started = time.perf_counter()
        log.info("%s: stages/%s.py", checkout, stage)
        subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=checkout, env=environment, check=True)
        seconds[stage] = round(time.perf_counter() - started, 1)
        if stage == "sample" and sampled_from is not None:
            own_sample = {name: sha256(checkout / name) for name in SAMPLED_FILES}
            for name in SAMPLED_FILES:
                shutil.copyfile(sampled_from.resolve() / name, checkout / name)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True,
                            check=True).stdout.strip()
    return {
        "commit": commit,
        "params": overrides,
        "sampled_from": str(sampled_from) if sampled_from else None,
        "own_sample_sha256": own_sample,
        "data_sha256": {name: sha256(checkout / name) for name in DATA_FILES},
        "data_column_sha256": {name: column_sha256(checkout / name) for name in DATA_FILES},
        "adapter_sha256": sha256(checkout / ADAPTER_WEIGHTS),
        "losses": read_losses(checkout),
        "stage_seconds": seconds,
    }


def field_comparison(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    common = sorted(set(before) & set(after))
    return {"equal": [name for name in common if before[name] == after[name]],
            "different": [name for name in common if before[name] != after[name]],
            "before_only": sorted(set(before) - set(after)), "after_only": sorted(set(after) - set(before))}


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    steps_before, steps_after = dict(before["losses"]), dict(after["losses"])
    common = sorted(set(steps_before) & set(steps_after))
    differences = [abs(steps_before[step] - steps_after[step]) for step in common]
    return {
        "data_files_equal": {name: before["data_sha256"][name] == after["data_sha256"][name]
                             for name in DATA_FILES},
        # per file: fields whose values are equal on both sides, fields that differ, fields only one side has
        "data_fields": {name: field_comparison(before["data_column_sha256"][name], after["data_column_sha256"][name])
                        for name in DATA_FILES},
        "adapter_weights_equal": before["adapter_sha256"] == after["adapter_sha256"],
        "steps_compared": len(common),
        "losses_identical": bool(common) and all(difference == 0.0 for difference in differences)
                            and len(steps_before) == len(steps_after),
        "max_abs_loss_difference": max(differences) if differences else None,
        "per_step": [{"step": step, "before": steps_before[step], "after": steps_after[step]} for step in common],
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train in one checkout and record its data hashes and losses")
    run.add_argument("checkout", type=Path)
    run.add_argument("--record", type=Path, required=True)
    run.add_argument("--max-steps", type=int, default=20)
    run.add_argument("--sampled-from", type=Path,
                     help="a checkout whose data/sampled/ rows this one formats and trains")
    both = commands.add_parser("compare", help="two records side by side")
    both.add_argument("before", type=Path)
    both.add_argument("after", type=Path)
    both.add_argument("--out", type=Path, required=True)
    both.add_argument("--note", action="append", default=[], help="a line for the record (what else was checked)")
    arguments = parser.parse_args()
    if arguments.command == "run":
        record = run_side(arguments.checkout, arguments.max_steps, arguments.sampled_from)
        io.write_json(arguments.record, record)
        return
    before, after = io.read_json(arguments.before), io.read_json(arguments.after)
    command = f"python -m bench.reshape_same_results compare {arguments.before} {arguments.after} --out {arguments.out}"
    result = {"command": command,
              "notes": arguments.note, **compare(before, after), "before": before, "after": after}
    io.write_json(arguments.out, result)
    log.info("data equal: %s; losses identical over %d steps: %s (max |difference| %s)",
             result["data_files_equal"], result["steps_compared"], result["losses_identical"],
             result["max_abs_loss_difference"])


if __name__ == "__main__":
    main()
