"""Training bench results: one measurement per variant and workload, the ratios against the same run's baseline
(speed, memory, the loss check), and the printed table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Measurement:
    variant: str
    workload: str
    steps: int
    step_time_s: float
    tokens_per_s: float
    useful_tokens_per_s: float
    peak_memory_gib: float
    losses: list[float]
    padding_share: float = 0.0


def ratios(results: list[Measurement], variant: str) -> dict[str, Any]:
    """One variant against the baseline of the same run, per workload."""
    by_key = {(m.variant, m.workload.split("_")[0]): m for m in results}
    out: dict[str, Any] = {}
    base_dense, dense = by_key.get(("baseline", "dense")), by_key.get((variant, "dense"))
    base_alpaca, alpaca = by_key.get(("baseline", "alpaca")), by_key.get((variant, "alpaca"))
    if base_dense and dense:
        out["train_speedup"] = round(dense.tokens_per_s / base_dense.tokens_per_s, 3)
        out["train_peak_memory_ratio"] = round(dense.peak_memory_gib / base_dense.peak_memory_gib, 3)
        differences = [abs(a - b) for a, b in zip(base_dense.losses, dense.losses)]
        out["dense_loss_steps_compared"] = len(differences)
        out["dense_loss_max_abs_diff"] = round(max(differences), 4)
        out["dense_loss_mean_abs_diff"] = round(sum(differences) / len(differences), 5)
    if dense and alpaca:
        out["packed_vs_dense_tokens_per_s"] = round(alpaca.tokens_per_s / dense.tokens_per_s, 3)
    if base_alpaca and alpaca:
        out["useful_tokens_speedup"] = round(alpaca.useful_tokens_per_s / base_alpaca.useful_tokens_per_s, 3)
        out["alpaca_padding_share"] = alpaca.padding_share
        out["alpaca_peak_memory_ratio"] = round(alpaca.peak_memory_gib / base_alpaca.peak_memory_gib, 3)
    return out


def summarize(results: list[Measurement]) -> dict[str, Any]:
    variants = sorted({m.variant for m in results} - {"baseline"})
    summary: dict[str, Any] = dict(ratios(results, "project")) if "project" in variants else {}
    summary["by_variant"] = {variant: ratios(results, variant) for variant in variants}
    return summary


def memory_lines(memory: dict[str, Any]) -> list[str]:
    lines = [f"memory with the project's defaults (limit {memory['limit_gib']} GiB):"]
    for entry in memory["by_micro_batch"]:
        peak = "OOM" if entry["peak_memory_gib"] is None else f"{entry['peak_memory_gib']:.2f} GiB"
        lines.append(f"  {entry['rows']} x 2048: {peak}")
    lines.append(f"  largest micro-batch x 2048 under the limit: {memory['largest_micro_batch_x2048_under_limit']}")
    return lines


def table(results: list[Measurement], summary: dict[str, Any]) -> str:
    lines = [f"{'variant':<10} {'workload':<22} {'step s':>8} {'tok/s':>9} {'useful tok/s':>13} {'peak GiB':>9}"]
    for m in results:
        lines.append(f"{m.variant:<10} {m.workload:<22} {m.step_time_s:>8.3f} {m.tokens_per_s:>9.0f} "
                     f"{m.useful_tokens_per_s:>13.0f} {m.peak_memory_gib:>9.2f}")
    lines += [f"{key}: {value}" for key, value in summary.items() if key not in ("by_variant", "memory")]
    lines += [f"{variant}: {values}" for variant, values in summary.get("by_variant", {}).items()]
    if "memory" in summary:
        lines += memory_lines(summary["memory"])
    return "\n".join(lines)
