"""The train stage's memory at the 70B width against its depth: each run's per-GPU peaks (loading and training) and
host memory, a straight line through them per figure, and that line at the full depth.

    python -m bench.layer_fit OUT/big_8.json OUT/big_16.json OUT/big_32.json --full-layers 80 --out OUT/big_fit.json

Each input is the stage's metrics/train.json merged with its metrics/timing/train.json and a `layers` key (what
gpu_run.sh's `big` phase writes). A line fits because every decoder layer holds the same weights, adapter and
checkpoint; the intercept is what does not grow with depth (embeddings, output projection, CUDA context).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FIGURES = ("load_peak_memory_gib_per_process", "peak_memory_gib_per_process", "host_peak_memory_gib_per_process")


def line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over x."""
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    return mean_y - slope * mean_x, slope


def fit(runs: list[dict[str, Any]], full_layers: int) -> dict[str, Any]:
    fits: dict[str, Any] = {}
    for figure in FIGURES:
        points = [(run["layers"], max(run[figure])) for run in runs if run.get(figure)]
        if len(points) < 2:
            continue
        intercept, slope = line(points)
        fits[figure] = {"gib_per_layer": round(slope, 4), "gib_fixed": round(intercept, 3),
                        f"gib_at_{full_layers}_layers": round(intercept + slope * full_layers, 2),
                        "measured": dict(points)}
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--full-layers", type=int, default=80)
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    runs = sorted((json.loads(path.read_text()) for path in arguments.runs), key=lambda run: run["layers"])
    summary = {"runs": runs, "fit": fit(runs, arguments.full_layers)}
    arguments.out.write_text(json.dumps(summary, indent=2) + "\n")
    for run in runs:
        print(f"{run['layers']:>3} layers: load {run.get('load_peak_memory_gib_per_process')} GiB, train "
              f"{run.get('peak_memory_gib_per_process')} GiB, host {run.get('host_peak_memory_gib_per_process')} GiB,"
              f" {run.get('tokens_per_s')} tok/s")
    for figure, values in summary["fit"].items():
        print(figure, values)


if __name__ == "__main__":
    main()
