"""The per-family GPU table from gpu_run.sh's `families` phase: train tok/s and peak memory (dense 4x2048 rows,
Alpaca-length rows packed and padded), evaluation `auto` against `plain`, and Unsloth where it ran.

    python -m bench.family_table OUT_DIR --out OUT_DIR/families.json

Reads OUT_DIR/family_<family>_{train,eval,unsloth}.json (bench/train_bench.py, bench/eval_bench.py,
bench/unsloth_bench.py), prints a markdown table and writes the same figures as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from support import ROOT
from support.families import FAMILY_FULL_SHAPES

# family -> the profile its bench takes (LoRA targets, speed settings); families without their own take the nearest.
FAMILY_PROFILES = {family: ROOT / "profiles" / name for family, name in {
    "llama3": "llama-3.1-8b.yaml", "qwen2.5": "qwen2.5-7b.yaml", "qwen3": "qwen2.5-7b.yaml",
    "gemma2": "gemma-2-9b.yaml", "gemma3-text": "gemma-2-9b.yaml", "phi3": "phi-3.5-mini.yaml"}.items()}
assert set(FAMILY_PROFILES) == set(FAMILY_FULL_SHAPES)


def read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def train_figures(train: dict[str, Any]) -> dict[str, Any]:
    """Useful tok/s and peak GiB per (variant, workload): the project packed and padded."""
    figures = {}
    for entry in train["results"]:
        name = "dense" if entry["workload"].startswith("dense") else (
            "alpaca_packed" if "packed" in entry["workload"] else "alpaca_padded")
        figures[f"{entry['variant']}_{name}"] = {"useful_tokens_per_s": entry["useful_tokens_per_s"],
                                                 "peak_memory_gib": entry["peak_memory_gib"]}
    return figures


def eval_figures(evaluation: dict[str, Any]) -> dict[str, Any]:
    by_variant = {entry["variant"]: entry for entry in evaluation["results"]}
    figures = {name: {key: entry.get(key) for key in ("new_tokens_per_s", "peak_memory_gib", "error")}
               for name, entry in by_variant.items()}
    auto = evaluation.get("by_variant", {}).get("auto", {})
    figures["auto_speedup_vs_plain"] = auto.get("speedup_vs_plain")
    figures["auto_rows_differing_from_plain"] = auto.get("rows_differing_from_plain")
    figures["auto_method"] = by_variant.get("auto", {}).get("method")
    return figures


def unsloth_figures(unsloth: dict[str, Any]) -> dict[str, Any]:
    best: dict[str, dict[str, Any]] = {}
    for entry in unsloth["results"]:
        name = "dense" if entry["workload"].startswith("dense") else "alpaca"
        if name not in best or entry["useful_tokens_per_s"] > best[name]["useful_tokens_per_s"]:
            best[name] = {"useful_tokens_per_s": entry["useful_tokens_per_s"], "peak_memory_gib":
                          entry["peak_memory_gib"], "workload": entry["workload"]}
    return {"version": unsloth.get("unsloth"), **best}


def collect(out_dir: Path) -> dict[str, Any]:
    families = {}
    for family in FAMILY_FULL_SHAPES:
        train, evaluation, unsloth = (read(out_dir / f"family_{family}_{kind}.json")
                                      for kind in ("train", "eval", "unsloth"))
        if not (train or evaluation):
            continue
        families[family] = {"profile": FAMILY_PROFILES[family].name,
                            "train": train_figures(train) if train else None,
                            "eval": eval_figures(evaluation) if evaluation else None,
                            "unsloth": unsloth_figures(unsloth) if unsloth else None,
                            "device": (train or evaluation)["device"]}
    return families


def cell(figures: dict[str, Any] | None, key: str) -> str:
    entry = (figures or {}).get(key)
    return "-" if not entry else f"{entry['useful_tokens_per_s']:,.0f} ({entry['peak_memory_gib']:.1f} GiB)"


def table(families: dict[str, Any]) -> str:
    lines = ["| family | dense 4x2048 tok/s (peak) | Alpaca-length packed useful tok/s (peak) | padded | "
             "Unsloth dense / Alpaca-length best | eval auto / plain new tok/s (method, rows differing) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for family, figures in families.items():
        train, evaluation, unsloth = figures["train"], figures["eval"], figures["unsloth"]
        unsloth_cell = "-"
        if unsloth and train:
            dense, packed = train.get("project_dense"), train.get("project_alpaca_packed")
            ratios = [f"{unsloth[name]['useful_tokens_per_s']:,.0f} "
                      f"(project {ours['useful_tokens_per_s'] / unsloth[name]['useful_tokens_per_s']:.2f}x)"
                      for name, ours in (("dense", dense), ("alpaca", packed)) if ours and name in unsloth]
            unsloth_cell = " / ".join(ratios) or "-"
        eval_cell = "-"
        if evaluation and "auto" in evaluation and "plain" in evaluation:
            auto, plain = evaluation["auto"], evaluation["plain"]
            eval_cell = (f"{auto['new_tokens_per_s']} / {plain['new_tokens_per_s']} = "
                         f"{evaluation['auto_speedup_vs_plain']}x ({evaluation['auto_method']}, "
                         f"{evaluation['auto_rows_differing_from_plain']} differ)"
                         if auto.get("new_tokens_per_s") and plain.get("new_tokens_per_s")
                         else f"error: {auto.get('error') or plain.get('error')}"[:80])
        lines.append(f"| {family} | {cell(train, 'project_dense')} | {cell(train, 'project_alpaca_packed')} | "
                     f"{cell(train, 'unpacked_alpaca_padded')} | {unsloth_cell} | {eval_cell} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    families = collect(arguments.out_dir)
    arguments.out.write_text(json.dumps(families, indent=2) + "\n")
    print(table(families))


if __name__ == "__main__":
    main()
