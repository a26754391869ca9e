"""Is a change's effect real? Compare the fine-tuned predictions of two revisions or experiments row by row.

    python -m alpaca_qlora.evaluation.compare_revisions main my-experiment [--json out.json]
    python -m alpaca_qlora.evaluation.compare_revisions HEAD workspace

`dvc metrics diff` says EM went up by 0.007; this says whether that is more than the noise of which eval rows
happened to be drawn. Each revision's data/predictions/finetuned.jsonl is read through DVC (from the cache or the
remote, as `dvc exp show` would), rows are paired by id, and every metric gets B minus A with the same paired
bootstrap interval as compare.json, plus the exact McNemar p for EM. A revision is anything git or DVC resolves:
a branch, tag or commit, or an experiment name from `dvc exp show`; `workspace` is the files on disk.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_qlora import io
from alpaca_qlora.config import load_params
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.evaluation.report import NOT_SIGNIFICANT_NOTE, delta_with_interval, format_p, format_value
from alpaca_qlora.evaluation.significance import CONFIDENCE, PairedDelta, compare_paired, exact_match_mcnemar, pair_rows
from alpaca_qlora.stage import run_command

PREDICTIONS = "data/predictions/finetuned.jsonl"
WORKSPACE = "workspace"
ON_INTERRUPT = "nothing was written (--json is written last); run `make compare-revs` again"

log = logging.getLogger("compare_revisions")


class RevisionError(PipelineError):
    """A revision cannot be resolved, or its predictions cannot be read."""


@dataclass(frozen=True)
class Revision:
    name: str  # as the user gave it
    commit: str | None  # None for the workspace


def resolve_revision(repo: Path, name: str) -> Revision:
    """The commit a branch, tag, sha or DVC experiment name points to (experiments live under refs/exps)."""
    if name == WORKSPACE:
        return Revision(name, None)
    from dvc.repo import Repo
    from dvc.scm import RevError, resolve_rev  # resolves experiment names too, as `dvc exp show` lists them

    with Repo(str(repo)) as dvc_repo:
        try:
            return Revision(name, resolve_rev(dvc_repo.scm, name))
        except RevError as error:
            raise RevisionError(f"'{name}' is neither a git revision nor an experiment of {repo} ({error}). "
                                "`git branch -a` and `dvc exp show` list what exists.") from error


def read_predictions(repo: Path, path: str, revision: Revision) -> list[dict[str, Any]]:
    """The predictions file as that revision recorded it, from DVC's cache (or remote) by its dvc.lock hash."""
    if revision.commit is None:
        if not (repo / path).is_file():
            raise RevisionError(f"{repo / path} does not exist in the workspace: run `dvc repro` first.")
        return io.read_jsonl(repo / path)
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        text = dvc.api.read(path, repo=str(repo), rev=revision.commit, mode="r", encoding="utf-8")
    except (DvcException, FileNotFoundError) as error:
        raise RevisionError(
            f"cannot read {path} at {revision.name} ({revision.commit[:10]}): {str(error).rstrip('.')}. If it ran the "
            "pipeline elsewhere, `dvc pull` (or `dvc exp pull <remote> <name>`) brings its outputs.") from error
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def compare_revisions(before: list[dict[str, Any]], after: list[dict[str, Any]], *, resamples: int,
                      seed: int) -> tuple[dict[str, PairedDelta], dict[str, Any]]:
    """Per metric B minus A over the paired rows, and EM's discordant counts with McNemar's p."""
    results = compare_paired(before, after, resamples=resamples, seed=seed)
    return results, exact_match_mcnemar(pair_rows(before, after))


def render_table(a: Revision, b: Revision, results: dict[str, PairedDelta], mcnemar: dict[str, Any],
                 n_paired: int) -> str:
    def label(revision: Revision) -> str:
        return revision.name if revision.commit is None else f"{revision.name} ({revision.commit[:10]})"

    lines = [f"A = {label(a)}, B = {label(b)}: {n_paired} rows paired by id", "",
             f"| metric | rows | A | B | B - A | {CONFIDENCE:.0%} interval |",
             "| --- | ---: | ---: | ---: | ---: | :---: |"]
    for name, result in results.items():
        delta, interval = delta_with_interval(result.delta, result.ci_low, result.ci_high)
        lines.append(f"| {name} | {result.n_rows} | {format_value(result.before)} | {format_value(result.after)} | "
                     f"{delta} | {interval} |")
    lines += ["", NOT_SIGNIFICANT_NOTE,
              f"exact_match: {mcnemar['exact_match_only_before']} rows right only in A, "
              f"{mcnemar['exact_match_only_after']} only in B; exact McNemar p = "
              f"{format_p(mcnemar['exact_match_mcnemar_p'])}."]
    return "\n".join(lines) + "\n"


def as_flat_keys(a: Revision, b: Revision, results: dict[str, PairedDelta], mcnemar: dict[str, Any],
                 n_paired: int, *, resamples: int, seed: int) -> dict[str, Any]:
    keys: dict[str, Any] = {"a": a.name, "a_commit": a.commit, "b": b.name, "b_commit": b.commit,
                            "n_paired_rows": n_paired, "bootstrap_resamples": resamples, "bootstrap_seed": seed}
    for name, result in results.items():
        keys.update({f"{name}_n_rows": result.n_rows, f"{name}_a": result.before, f"{name}_b": result.after,
                     f"{name}_delta": result.delta, f"{name}_delta_ci_low": result.ci_low,
                     f"{name}_delta_ci_high": result.ci_high})
    return {**keys, **mcnemar}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="the baseline revision: branch, tag, commit, experiment name, or 'workspace'")
    parser.add_argument("b", help="the revision compared with it (B - A is reported)")
    parser.add_argument("--path", default=PREDICTIONS, help=f"predictions file in the repository ({PREDICTIONS})")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project's root (default: here)")
    parser.add_argument("--json", type=Path, help="also write the results as flat keys to this JSON file")
    parser.add_argument("--resamples", type=int,
                        help="bootstrap resamples (default: params.yaml eval.bootstrap_resamples)")
    parser.add_argument("--seed", type=int, help="bootstrap seed (default: params.yaml eval.bootstrap_seed)")
    arguments = parser.parse_args()
    repo = arguments.repo.resolve()
    defaults = load_params(repo / "params.yaml").eval
    resamples = arguments.resamples if arguments.resamples is not None else defaults.bootstrap_resamples
    seed = arguments.seed if arguments.seed is not None else defaults.bootstrap_seed
    if resamples < 1:
        parser.error(f"--resamples {resamples}: expected a positive count (10000 or more for a steady interval)")
    a, b = resolve_revision(repo, arguments.a), resolve_revision(repo, arguments.b)
    before, after = read_predictions(repo, arguments.path, a), read_predictions(repo, arguments.path, b)
    n_paired = len(pair_rows(before, after))
    if n_paired < max(len(before), len(after)):
        log.warning("only %d of %d / %d rows share an id: the eval splits differ; comparing the shared rows",
                    n_paired, len(before), len(after))
    results, mcnemar = compare_revisions(before, after, resamples=resamples, seed=seed)
    sys.stdout.write(render_table(a, b, results, mcnemar, n_paired))
    if arguments.json:
        io.write_json(arguments.json, as_flat_keys(a, b, results, mcnemar, n_paired, resamples=resamples, seed=seed))
        log.info("wrote %s", arguments.json)


if __name__ == "__main__":
    run_command(main, name="the comparison", on_interrupt=ON_INTERRUPT)
