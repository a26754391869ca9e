"""Error bars for a change in a metric: paired bootstrap intervals over the same rows, and McNemar's exact test.

Two models answered the same eval rows, so their difference is measured row by row: resampling rows (with the
pairs kept together) gives the spread a delta would have on another draw of eval rows of this size. A delta whose
interval spans 0 could be noise. The intervals are percentile intervals from a seeded generator, so the same
predictions give byte-identical keys; each metric draws from its own stream, derived from the seed and the
metric's name, so adding a metric changes no other metric's interval.

Each metric is aggregated as `metrics.aggregate` does it, over the rows where it is defined, so the point
estimate here is the delta compare.json reports. Adding a metric is one entry in PAIRED_METRICS.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.evaluation.metrics import DECIMALS, task_type_of

CONFIDENCE = 0.95
RESAMPLE_CHUNK = 1000  # resamples drawn at a time: bounds memory at RESAMPLE_CHUNK x rows per array

Row = Mapping[str, Any]


class UnpairedRowsError(PipelineError, ValueError):
    """The two sets of predictions share no row id, so nothing can be compared row by row."""


@dataclass(frozen=True)
class PairedMetric:
    """A metric as sum(value) / sum(weight) over the rows where `value` is not None (weight 1: a plain mean)."""

    value: Callable[[Row], float | bool | None]
    weight: Callable[[Row], float] = lambda row: 1.0


def _field(name: str) -> Callable[[Row], Any]:
    return lambda row: row.get(name)


def _on_short_answer_rows(name: str) -> Callable[[Row], Any]:
    return lambda row: row.get(name) if row.get("short_answer") else None


PAIRED_METRICS: dict[str, PairedMetric] = {
    "exact_match": PairedMetric(_on_short_answer_rows("exact_match")),
    "exact_match_strict": PairedMetric(_on_short_answer_rows("exact_match_strict")),
    "f1": PairedMetric(_on_short_answer_rows("f1")),
    "f1_all": PairedMetric(_field("f1")),
    "stop_rate": PairedMetric(_field("stopped_by_eos")),
    "verbosity": PairedMetric(_field("answer_words"), weight=_field("reference_words")),
    "key_fact_recall": PairedMetric(_field("key_fact_recall")),
    "label_adherence": PairedMetric(_field("label_adherence")),
    "unsupported_word_share": PairedMetric(_field("unsupported_word_share")),
    "cut_by_limit_rate": PairedMetric(_field("cut_by_limit")),
}


@dataclass(frozen=True)
class PairedDelta:
    """After minus before over `n_rows` paired rows, with its bootstrap interval (None where undefined)."""

    n_rows: int
    before: float | None
    after: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def significant(self) -> bool:
        return is_significant(self.ci_low, self.ci_high)


def is_significant(ci_low: float | None, ci_high: float | None) -> bool:
    """Whether the interval excludes 0; one that touches or spans 0 (or is missing) is not significant."""
    return ci_low is not None and ci_high is not None and (ci_low > 0 or ci_high < 0)


def pair_rows(before: Sequence[Row], after: Sequence[Row]) -> list[tuple[Row, Row]]:
    """(before, after) rows joined on `id`, in the order of `after` (the order metrics.aggregate summed in)."""
    before_by_id = {row["id"]: row for row in before}
    pairs = [(before_by_id[row["id"]], row) for row in after if row["id"] in before_by_id]
    if not pairs and (before or after):
        raise UnpairedRowsError("the two sets of predictions share no row id: they were made on different eval "
                                "splits, so no row-by-row comparison is possible. Compare predictions of the same "
                                "eval rows (data/formatted/eval.jsonl).")
    return pairs


def _rounded(value: float) -> float:
    return round(value, DECIMALS)


def _ratio(values: Sequence[float], weights: Sequence[float]) -> float | None:
    """As metrics.aggregate computes it (Python sums in row order), so the point estimate matches to the digit."""
    total = sum(weights)
    return _rounded(sum(values) / total) if total else None


def _resampled_deltas(arrays: Sequence[np.ndarray], resamples: int, rng: np.random.Generator) -> np.ndarray:
    before_values, before_weights, after_values, after_weights = arrays
    n_rows = len(before_values)
    chunks = []
    for start in range(0, resamples, RESAMPLE_CHUNK):
        rows = rng.integers(0, n_rows, size=(min(RESAMPLE_CHUNK, resamples - start), n_rows))
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample of zero total weight is left out
            chunks.append(after_values[rows].sum(axis=1) / after_weights[rows].sum(axis=1)
                          - before_values[rows].sum(axis=1) / before_weights[rows].sum(axis=1))
    deltas = np.concatenate(chunks)
    return deltas[np.isfinite(deltas)]


def paired_delta(pairs: Sequence[tuple[Row, Row]], metric: PairedMetric, *, name: str, resamples: int,
                 seed: int) -> PairedDelta:
    """One metric's delta and percentile bootstrap interval over the pairs where it is defined on both sides.

    Rows are resampled in id order, so the interval does not depend on the files' row order.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    defined = [(before, after) for before, after in pairs
               if metric.value(before) is not None and metric.value(after) is not None]
    columns = [[float(getter(row)) for row in side] for side in zip(*defined)
               for getter in (metric.value, metric.weight)]  # before values, weights, after values, weights
    before, after = (_ratio(*columns[:2]), _ratio(*columns[2:])) if defined else (None, None)
    if before is None or after is None:
        return PairedDelta(n_rows=len(defined), before=before, after=after, delta=None, ci_low=None, ci_high=None)
    order = sorted(range(len(defined)), key=lambda index: str(defined[index][1]["id"]))
    # Integers on the metrics' rounding grid: their sums are exact in any order, so no CPU's SIMD width can move
    # an interval's end (float sums of F1 scores could differ in the last bit and round differently).
    arrays = [np.rint(np.array(column, dtype=np.float64)[order] * 10**DECIMALS).astype(np.int64)
              for column in columns]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(_resampled_deltas(arrays, resamples, rng), [tail, 100 - tail])
    return PairedDelta(n_rows=len(defined), before=before, after=after, delta=_rounded(after - before),
                       ci_low=_rounded(float(low)), ci_high=_rounded(float(high)))


def mcnemar_exact_p(before_only: int, after_only: int) -> float:
    """Two-sided exact McNemar p: a binomial test of the discordant pairs against an even split.

    Only rows that one model gets right and the other wrong say anything about which is better; with no such
    rows the models are indistinguishable (p = 1). Computed with exact integers, as scipy's binomtest would.
    """
    discordant = before_only + after_only
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(before_only, after_only) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** discordant)))  # not rounded: small p-values matter


def exact_match_mcnemar(pairs: Sequence[tuple[Row, Row]]) -> dict[str, Any]:
    """Discordant exact-match counts on the short-answer rows (where EM is counted) and McNemar's p."""
    counted = PAIRED_METRICS["exact_match"].value
    outcomes = [(bool(counted(before)), bool(counted(after))) for before, after in pairs
                if counted(before) is not None and counted(after) is not None]
    before_only = sum(1 for before, after in outcomes if before and not after)
    after_only = sum(1 for before, after in outcomes if after and not before)
    return {"exact_match_only_before": before_only, "exact_match_only_after": after_only,
            "exact_match_mcnemar_p": mcnemar_exact_p(before_only, after_only)}


def compare_paired(before: Sequence[Row], after: Sequence[Row], *, resamples: int, seed: int,
                   metrics: Mapping[str, PairedMetric] = PAIRED_METRICS) -> dict[str, PairedDelta]:
    pairs = pair_rows(before, after)
    return {name: paired_delta(pairs, metric, name=name, resamples=resamples, seed=seed)
            for name, metric in metrics.items()}


def significance_keys(pairs: Sequence[tuple[Row, Row]], *, resamples: int, seed: int) -> dict[str, Any]:
    """Flat keys for a metrics file: `<metric>_delta_ci_low` / `_ci_high` per metric, and `exact_match_mcnemar_p`."""
    keys: dict[str, Any] = {}
    for name, metric in PAIRED_METRICS.items():
        result = paired_delta(pairs, metric, name=name, resamples=resamples, seed=seed)
        keys[f"{name}_delta_ci_low"], keys[f"{name}_delta_ci_high"] = result.ci_low, result.ci_high
    keys["exact_match_mcnemar_p"] = exact_match_mcnemar(pairs)["exact_match_mcnemar_p"]
    return keys


def delta_significance(before: Sequence[Row], after: Sequence[Row], *, resamples: int,
                       seed: int) -> dict[str, Any]:
    """significance_keys overall and per task type, shaped like metrics.metric_deltas to merge into it."""
    pairs = pair_rows(before, after)
    groups: dict[str, list[tuple[Row, Row]]] = {}
    for pair in pairs:
        groups.setdefault(task_type_of(pair[1]), []).append(pair)
    return {"overall": significance_keys(pairs, resamples=resamples, seed=seed),
            "by_task_type": {task_type: significance_keys(groups[task_type], resamples=resamples, seed=seed)
                             for task_type in sorted(groups)}}


def with_significance(deltas: dict[str, Any], significance: dict[str, Any]) -> dict[str, Any]:
    """metric_deltas' blocks with delta_significance's keys added beside the deltas they qualify."""
    task_types = sorted(set(deltas["by_task_type"]) | set(significance["by_task_type"]))
    return {**deltas,
            "overall": {**deltas["overall"], **significance["overall"]},
            "by_task_type": {task_type: {**deltas["by_task_type"].get(task_type, {}),
                                         **significance["by_task_type"].get(task_type, {})}
                             for task_type in task_types}}
