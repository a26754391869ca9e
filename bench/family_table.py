"""The per-family GPU table from gpu_run.sh's `families` phase: train tok/s and peak memory (dense 4x2048 rows,
Alpaca-length rows packed and padded), evaluation `auto` against `plain`, and Unsloth where it ran.

    python -m bench.family_table OUT_DIR --out OUT_DIR/families.json
    python -m bench.family_table --profile-of FAMILY      # the profile path the family's bench takes (gpu_run.sh)

Reads OUT_DIR/family_<family>_{train,eval,unsloth}.json (bench/train_bench.py's write_results, bench/eval_bench.py's
and bench/unsloth_bench.py's main), one row per family; a family with only some of them gets '-' for the rest (a
bench that ran out of time or memory). Prints a markdown table and writes the same figures as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from support import ROOT
from support.families import FAMILY_FULL_SHAPES, FAMILY_PROFILE

# family -> the profile file its bench takes (LoRA targets, speed settings)
FAMILY_PROFILES = {family: ROOT / "profiles" / f"{name}.yaml" for family, name in FAMILY_PROFILE.items()}


def read(path: Path) -> dict[str, Any] | None:
    """A bench's JSON, or None where that bench wrote none (timed out, out of memory, not run for the family)."""
    return json.loads(path.read_text()) if path.is_file() else None


def ratio(numerator: dict[str, Any] | None, denominator: dict[str, Any] | None, key: str) -> float | None:
    """numerator[key] / denominator[key], where both were measured."""
    if not numerator or not denominator or not denominator.get(key) or numerator.get(key) is None:
        return None
    return round(numerator[key] / denominator[key], 3)


def workload_name(workload: str) -> str:
    """train_bench's workload names shortened to the table's: dense, alpaca_packed or alpaca_padded."""
    if workload.startswith("dense"):
        return "dense"
    return "alpaca_packed" if workload.startswith("alpaca_packed") else "alpaca_padded"


def train_figures(train: dict[str, Any]) -> dict[str, Any]:
    """Useful tok/s and peak GiB per `<variant>_<workload>` (project packs, unpacked pads), and packing's gain over
    padding on Alpaca-length rows: the figure a family's packed path has to earn."""
    figures: dict[str, Any] = {
        f"{entry['variant']}_{workload_name(entry['workload'])}": {
            "useful_tokens_per_s": entry["useful_tokens_per_s"], "peak_memory_gib": entry["peak_memory_gib"]}
        for entry in train["results"]}
    packed, padded = figures.get("project_alpaca_packed"), figures.get("unpacked_alpaca_padded")
    figures["packed_over_padded_useful_tokens"] = ratio(packed, padded, "useful_tokens_per_s")
    figures["packed_over_padded_peak_memory"] = ratio(packed, padded, "peak_memory_gib")
    return figures


def eval_figures(evaluation: dict[str, Any]) -> dict[str, Any]:
    """New tok/s and peak per variant (or its error), and auto's speedup and rows differing from plain (eval_bench's
    summary: present only when both ran)."""
    by_variant = {entry["variant"]: entry for entry in evaluation["results"]}
    keys = ("method", "weights", "new_tokens_per_s", "peak_memory_gib", "error")
    figures: dict[str, Any] = {name: {key: entry.get(key) for key in keys} for name, entry in by_variant.items()}
    auto = evaluation.get("by_variant", {}).get("auto", {})
    figures["auto_speedup_vs_plain"] = auto.get("speedup_vs_plain")
    figures["auto_rows_differing_from_plain"] = auto.get("rows_differing_from_plain")
    return figures


def unsloth_figures(unsloth: dict[str, Any], train: dict[str, Any] | None) -> dict[str, Any]:
    """Unsloth's best measurement per workload (dense; Alpaca-length rows padded or its own packing, whichever was
    faster), and the project's figure over it (the project packed on Alpaca-length rows): above 1, the project is
    faster."""
    best: dict[str, dict[str, Any]] = {}
    for entry in unsloth["results"]:
        name = "dense" if entry["workload"].startswith("dense") else "alpaca"
        if name not in best or entry["useful_tokens_per_s"] > best[name]["useful_tokens_per_s"]:
            best[name] = {key: entry[key] for key in ("variant", "workload", "useful_tokens_per_s", "peak_memory_gib")}
    ours = {"dense": (train or {}).get("project_dense"), "alpaca": (train or {}).get("project_alpaca_packed")}
    for name, entry in best.items():
        entry["project_over_unsloth"] = ratio(ours[name], entry, "useful_tokens_per_s")
    return {"version": unsloth.get("unsloth"), **best}


def family_figures(out_dir: Path, family: str) -> dict[str, Any] | None:
    """One family's figures from its benches' JSON files, None when neither train nor eval wrote one."""
    train, evaluation, unsloth = (read(out_dir / f"family_{family}_{kind}.json")
                                  for kind in ("train", "eval", "unsloth"))
    if not (train or evaluation):
        return None
    train_part = train_figures(train) if train else None
    return {"profile": FAMILY_PROFILES[family].name, "device": (train or evaluation)["device"],
            "train": train_part, "eval": eval_figures(evaluation) if evaluation else None,
            "unsloth": unsloth_figures(unsloth, train_part) if unsloth else None}


def collect(out_dir: Path) -> dict[str, Any]:
    """Every family that left figures in out_dir, in FAMILY_FULL_SHAPES' order."""
    families = {family: family_figures(out_dir, family) for family in FAMILY_FULL_SHAPES}
    return {family: figures for family, figures in families.items() if figures}


def speed_cell(entry: dict[str, Any] | None) -> str:
    """'tok/s (peak GiB)', or '-' where not measured."""
    if not entry:
        return "-"
    return f"{entry['useful_tokens_per_s']:,.0f} ({entry['peak_memory_gib']:.1f} GiB)"


def number_cell(value: float | None, suffix: str = "x") -> str:
    """A ratio, or '-' where it could not be taken."""
    return "-" if value is None else f"{value}{suffix}"


def unsloth_cell(unsloth: dict[str, Any] | None) -> str:
    """Unsloth's best dense / Alpaca-length tok/s, each with the project's figure over it."""
    if not unsloth:
        return "-"
    parts = [f"{speed_cell(unsloth[name])}, project {number_cell(unsloth[name]['project_over_unsloth'])}"
             for name in ("dense", "alpaca") if name in unsloth]
    return " / ".join(parts) or "-"


def eval_cell(evaluation: dict[str, Any] | None) -> str:
    """plain and auto new tok/s, auto's speedup, method and rows differing; an error where a variant failed."""
    if not evaluation:
        return "-"
    plain, auto = evaluation.get("plain", {}), evaluation.get("auto", {})
    if not (plain.get("new_tokens_per_s") and auto.get("new_tokens_per_s")):
        return f"error: {auto.get('error') or plain.get('error') or 'a variant is missing'}"[:100]
    return (f"{plain['new_tokens_per_s']:,.0f} / {auto['new_tokens_per_s']:,.0f} = "
            f"{number_cell(evaluation['auto_speedup_vs_plain'])} ({auto['method']}, "
            f"{evaluation['auto_rows_differing_from_plain']} rows differ)")


def table_row(family: str, figures: dict[str, Any]) -> str:
    """One family's markdown row."""
    train = figures["train"] or {}
    cells = [family, figures["profile"], speed_cell(train.get("project_dense")),
             speed_cell(train.get("project_alpaca_packed")), speed_cell(train.get("unpacked_alpaca_padded")),
             number_cell(train.get("packed_over_padded_useful_tokens")), unsloth_cell(figures["unsloth"]),
             eval_cell(figures["eval"])]
    return "| " + " | ".join(cells) + " |"


def table(families: dict[str, Any]) -> str:
    """The markdown table: useful tok/s with peak memory, one row per family."""
    header = ["family", "profile", "dense 4x2048 tok/s (peak)", "Alpaca-length packed useful tok/s (peak)",
              "padded", "packed / padded", "Unsloth best dense / Alpaca-length (project / Unsloth)",
              "eval new tok/s plain / auto (method, rows differing)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + [table_row(family, figures) for family, figures in families.items()])


def main() -> None:
    """Print a family's profile path (--profile-of), or collect OUT_DIR's figures, write the JSON, print the
    table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, nargs="?")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile-of", choices=sorted(FAMILY_PROFILES), help="print this family's profile and exit")
    arguments = parser.parse_args()
    if arguments.profile_of:
        print(FAMILY_PROFILES[arguments.profile_of])
        return
    if not (arguments.out_dir and arguments.out):
        parser.error("give OUT_DIR --out FILE, or --profile-of FAMILY")
    families = collect(arguments.out_dir)
    arguments.out.write_text(json.dumps(families, indent=2) + "\n")
    print(table(families))


if __name__ == "__main__":
    main()
