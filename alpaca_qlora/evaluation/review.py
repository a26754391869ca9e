"""The review a change gets: is it real, what moved, and which answers flipped. `make review BASE=main`.

    python -m alpaca_qlora.evaluation.review main [workspace] [--out reports/review.md]

`dvc metrics diff main` says EM moved; a reviewer also needs the noise around it, which params caused it, and a
few concrete answers that changed. This writes one markdown file (the PR comment CI posts): the params that
changed, the fine-tuned result metrics with paired intervals and McNemar p (compare_revisions does the maths),
the other metrics `dvc metrics diff` lists, the rows whose exact match flipped, and timing apart from results.
Two runs whose eval rows or scoring differ measure different things, so they are refused with the reason.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alpaca_qlora import io
from alpaca_qlora.config import load_params
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.evaluation.compare_revisions import (
    PREDICTIONS,
    WORKSPACE,
    Revision,
    compare_revisions,
    read_predictions,
    render_table,
    resolve_revision,
)
from alpaca_qlora.evaluation.report import format_value, prompt_excerpt, select_examples, table_cell
from alpaca_qlora.evaluation.significance import pair_rows
from alpaca_qlora.stage import TIMING_DIR, run_command

OUT = Path("reports/review.md")
TITLE = "alpaca-qlora review"
ON_INTERRUPT = f"{OUT} is left as it was (it is written last); run `make review` again"
FLIPPED_ROWS = 3
# Files whose keys the paired table already has (the fine-tuned eval) or that are deltas against the base model.
PAIRED_METRIC_FILES = ("metrics/eval_finetuned.json", "metrics/compare.json")
# Params that decide which rows are evaluated and how answers are produced and scored: if one differs, the two
# runs answer different questions (or are graded differently) and a delta says nothing about the change.
SAME_EVAL_SPLIT = ("data.source", "data.hub_id", "data.hub_revision", "data.hub_file", "data.path", "data.eval_size",
                   "data.seed", "eval.min_short_answer", "eval.short_answer_max_words", "eval.short_answer_task_types")
SAME_EVAL_PARAMS = ("eval.max_new_tokens", "eval.max_new_tokens_cap", "eval.generation", "eval.merge_bf16",
                    "eval.fold_lora")
SAME_BASE_MODEL = ("model.name",)

log = logging.getLogger("review")


class NotComparableError(PipelineError):
    """The two runs evaluated different rows, scored them differently, or fine-tuned different base models."""


def changed_params(repo: Path, a: Revision, b: Revision) -> dict[str, tuple[Any, Any]]:
    """{param: (A value, B value)} for every params.yaml key that differs, as `dvc params diff A B` lists them."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        diff = dvc_repo.params.diff(a_rev=a.commit or WORKSPACE, b_rev=b.commit or WORKSPACE)
    return {key: (change.get("old"), change.get("new"))
            for keys in diff.get("diff", {}).values() for key, change in sorted(keys.items())}


def refusal(changed: dict[str, tuple[Any, Any]]) -> str | None:
    """Why the two runs cannot be compared, or None when they can."""
    reasons = [(SAME_EVAL_SPLIT, "the eval split differs (other rows were drawn or counted as short-answer)"),
               (SAME_EVAL_PARAMS, "the eval params differ (answers are generated under other limits or code paths)"),
               (SAME_BASE_MODEL, "the base model differs")]
    found = [f"{why}: " + ", ".join(f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in keys
                                    if key in changed)
             for keys, why in reasons if any(key in changed for key in keys)]
    if not found:
        return None
    return ("Not comparable: " + "; ".join(found) + ". A delta between them would mix the change with what was "
            "measured. Compare each against a baseline run with the same eval settings instead.")


def other_metric_changes(repo: Path, a: Revision, b: Revision) -> list[tuple[str, str, Any, Any]]:
    """(file, key, A, B) for `dvc metrics diff` keys outside PAIRED_METRIC_FILES: no per-row interval exists."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        diff = dvc_repo.metrics.diff(a_rev=a.commit or WORKSPACE, b_rev=b.commit or WORKSPACE)
    return [(path, key, change.get("old"), change.get("new"))
            for path, keys in sorted(diff.get("diff", {}).items()) if path not in PAIRED_METRIC_FILES
            for key, change in sorted(keys.items())]


def read_timing(repo: Path, revision: Revision) -> dict[str, dict[str, Any]]:
    """{stage: its metrics/timing/<stage>.json} at a revision: machine figures, kept out of the results."""
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(str(repo), rev=revision.commit)
    paths = sorted(fs.glob(f"{TIMING_DIR.as_posix()}/*.json"))
    return {Path(path).stem: json.loads(fs.read_text(path)) for path in paths}


def flipped_rows(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]],
                 k: int) -> dict[str, list[dict[str, Any]]]:
    """Up to k short-answer rows whose exact match B gained and k it lost, ranked as the compare report ranks."""
    ranked = select_examples(before, after, len(after))
    return {"gained": [row for row in ranked["wins"] if row["delta"].get("exact_match", 0) > 0][:k],
            "lost": [row for row in ranked["losses"] if row["delta"].get("exact_match", 0) < 0][:k]}


def _params_lines(changed: dict[str, tuple[Any, Any]]) -> list[str]:
    if not changed:
        return ["No param changed."]
    return ["| param | A | B |", "| --- | --- | --- |",
            *(f"| {key} | {table_cell(str(old))} | {table_cell(str(new))} |" for key, (old, new) in changed.items())]


def _other_metric_lines(changes: list[tuple[str, str, Any, Any]]) -> list[str]:
    if not changes:
        return ["No other metric changed."]
    return ["| file | metric | A | B |", "| --- | --- | ---: | ---: |",
            *(f"| {path} | {key} | {format_value(old)} | {format_value(new)} |" for path, key, old, new in changes)]


def _flipped_lines(flipped: dict[str, list[dict[str, Any]]], n_gained: int, n_lost: int) -> list[str]:
    lines = [f"Exact match gained on {n_gained} short-answer rows, lost on {n_lost}. Up to {FLIPPED_ROWS} of each, "
             "largest F1 change first (ties by id):", ""]
    for title, key in (("Gained (wrong in A, right in B)", "gained"), ("Lost (right in A, wrong in B)", "lost")):
        lines += [f"**{title}**", ""]
        if not flipped[key]:
            lines += ["None.", ""]
            continue
        lines += ["| id | prompt | reference | A answer | B answer |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{row['id']}` | {table_cell(prompt_excerpt(row['prompt']), 200)} | "
                  f"{table_cell(row['reference'], 120)} | {table_cell(row['base_answer'], 160)} | "
                  f"{table_cell(row['finetuned_answer'], 160)} |" for row in flipped[key]]
        lines.append("")
    return lines


def _timing_lines(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[str]:
    rows = [(stage, key, before.get(stage, {}).get(key), after.get(stage, {}).get(key))
            for stage in sorted(set(before) | set(after))
            for key in sorted(set(before.get(stage, {})) | set(after.get(stage, {})))]
    if not rows:
        return ["No timing recorded."]
    return ["Machine-dependent (where each ran), so not a result.", "", "| stage | figure | A | B |",
            "| --- | --- | ---: | ---: |",
            *(f"| {stage} | {key} | {format_value(old)} | {format_value(new)} |" for stage, key, old, new in rows)]


def render_review(*, table: str, changed: dict[str, tuple[Any, Any]], other: list[tuple[str, str, Any, Any]],
                  flipped: dict[str, list[dict[str, Any]]], counts: tuple[int, int],
                  timing: tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]) -> str:
    """The review markdown: params, paired results, other metrics, flipped rows, then timing on its own."""
    lines = [f"## {TITLE}", "", "### Params changed", "", *_params_lines(changed), "",
             "### Results (fine-tuned eval, paired by row id)", "", table.rstrip("\n"), "",
             "### Other metrics (`dvc metrics diff`; no per-row interval)", "", *_other_metric_lines(other), "",
             "### Flipped rows", "", *_flipped_lines(flipped, *counts), "### Timing", "", *_timing_lines(*timing)]
    return "\n".join(lines).rstrip("\n") + "\n"


def review(repo: Path, a: Revision, b: Revision, *, resamples: int, seed: int) -> str:
    """The review of B against A, or NotComparableError before anything is computed."""
    changed = changed_params(repo, a, b)
    reason = refusal(changed)
    if reason:
        raise NotComparableError(reason)
    before, after = read_predictions(repo, PREDICTIONS, a), read_predictions(repo, PREDICTIONS, b)
    n_paired = len(pair_rows(before, after))
    results, mcnemar = compare_revisions(before, after, resamples=resamples, seed=seed)
    return render_review(
        table=render_table(a, b, results, mcnemar, n_paired), changed=changed,
        other=other_metric_changes(repo, a, b), flipped=flipped_rows(before, after, FLIPPED_ROWS),
        counts=(mcnemar["exact_match_only_after"], mcnemar["exact_match_only_before"]),
        timing=(read_timing(repo, a), read_timing(repo, b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the baseline: branch, tag, commit or experiment name (A)")
    parser.add_argument("rev", nargs="?", default=WORKSPACE, help="what is reviewed (B; default: the workspace)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project's root (default: here)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the markdown goes ({OUT})")
    arguments = parser.parse_args()
    repo = arguments.repo.resolve()
    defaults = load_params(repo / "params.yaml").eval
    a, b = resolve_revision(repo, arguments.base), resolve_revision(repo, arguments.rev)
    out = arguments.out if arguments.out.is_absolute() else repo / arguments.out
    try:
        text = review(repo, a, b, resamples=defaults.bootstrap_resamples, seed=defaults.bootstrap_seed)
    except NotComparableError as error:
        io.write_text(out, f"## {TITLE}\n\n**{error}**\n")  # the PR still gets a comment that says why
        raise
    io.write_text(out, text)
    log.info("wrote %s", out)


if __name__ == "__main__":
    run_command(main, name="the review", on_interrupt=ON_INTERRUPT)
