"""What every stage script does around its own work: logging, its inputs checked, its outs replaced together, and
user errors, file-system errors and interruptions turned into one clear line instead of a traceback.

DVC runs each stage with its outs in place (`persist: true` in dvc.yaml): the stage writes its new outs beside the
old ones and moves them in only when it has succeeded, so a failed, full-disk or interrupted run leaves the previous
outs as dvc.lock records them, and `dvc repro` simply runs the stage again. The commands that are not stages
(`make review`, `make sweep`, ...) get the same one-line errors through run_command, with their own advice.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alpaca_qlora import io
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.stage_map import StageMap, stage_map

log = logging.getLogger("alpaca_qlora")

# Figures that depend on the machine, not on code, data and params: they go to metrics/timing/<stage>.json (a
# plain out, not a DVC metric), so `dvc metrics diff` of an unchanged pipeline on another machine lists no key.
# Figures of this machine and this call, not of the result: kept out of `dvc metrics diff`. A resumed run's
# `resumed_from_step` is one too, since its results equal an uninterrupted run's.
TIMING_KEYS = frozenset({"runtime_s", "generation_s", "new_tokens_per_s", "tokens_per_s", "labelled_tokens_per_s",
                         "peak_memory_gib", "peak_memory_kind", "resumed_from_step", "peak_memory_gib_per_process",
                         "load_peak_memory_gib_per_process", "host_peak_memory_gib_per_process"})
# what the memory budget decided on this card; what float64 decided for the float32 copy on this CPU
TIMING_PREFIXES = ("memory_plan_", "near_tie_")
TIMING_DIR = Path("metrics/timing")


def split_timing(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, timing) of a flat metrics dict."""
    timing = {key: value for key, value in metrics.items() if key in TIMING_KEYS or key.startswith(TIMING_PREFIXES)}
    return {key: value for key, value in metrics.items() if key not in timing}, timing


def timing_path(stage: str) -> Path:
    return TIMING_DIR / f"{stage}.json"


class EmptyInputError(PipelineError):
    """A stage's input holds no rows: its work (and every later stage's) would be empty or fail obscurely."""


def require_rows(rows: list[Any], what: str, fix: str) -> list[Any]:
    """`rows` unchanged, or an error saying that `what` is empty and how to fix it."""
    if not rows:
        raise EmptyInputError(f"{what} has no rows: {fix}")
    return rows


def missing_input_message(path: str | os.PathLike[str], made_by: str) -> str:
    return (f"{path} is missing: the {made_by} stage makes it. Run `dvc repro {made_by}` (or `dvc checkout {path}` "
            "to restore the version dvc.lock records).")


def read_input_rows(path: Path, made_by: str) -> list[dict[str, Any]]:
    """The rows of an input file that an earlier stage wrote, refusing a missing or empty one."""
    if not Path(path).exists():
        raise PipelineError(missing_input_message(path, made_by))
    return require_rows(io.read_jsonl(path), str(path),
                        f"rerun `dvc repro {made_by}` and read its log (it may have dropped every row).")


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("ALPACA_QLORA_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


KEPT = "its previous outs are kept as they were (dvc.lock still records them)"
# What to do about an OSError that the machine, not the code, caused; any other errno is a bug and keeps its trace.
FILE_SYSTEM_FIXES = {
    errno.ENOSPC: "the disk is full: free some space (`df -h` on that path shows the disk)",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.EACCES: "no permission to write there: fix the folder's owner or mode (`ls -ld` shows them)",
    errno.EPERM: "the operation is not permitted there: fix the folder's owner or mode (`ls -ld` shows them)",
    errno.EROFS: "the file system is read-only: run the pipeline where it can write",
    errno.EISDIR: "a folder stands where a file goes: move or remove it",
    errno.ENOTDIR: "a file stands where a folder goes: move or remove it",
    errno.EEXIST: "a file stands where a folder goes: move or remove it",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the stage unwinds and nothing is moved into place."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def interrupted_message(command: str, signum: int, committed: bool, on_interrupt: str) -> str:
    if committed:  # the signal came as the last rename finished: the outs are new but DVC recorded nothing
        return (f"{command} was interrupted ({signal.Signals(signum).name}) after writing all its outs; run "
                "`dvc repro` to record them (it reruns the stage).")
    resume = f"; {on_interrupt}" if on_interrupt else ""
    return (f"{command} was interrupted ({signal.Signals(signum).name}): {KEPT}. Run `dvc repro` to run it "
            f"again{resume}.")


def file_system_message(error: OSError, then: str) -> str | None:
    """One line for an OSError the machine caused, ending with `then` (what was kept, how to go on); None for any
    other errno."""
    fix = FILE_SYSTEM_FIXES.get(error.errno or 0)
    if fix is None:
        return None
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror}; {fix}. {then}"


def check_inputs(stages: StageMap) -> None:
    """Name the stage that makes a missing input, before any work (a stage run alone after `dvc checkout`, say)."""
    for path, made_by in stages.missing_inputs().items():
        raise PipelineError(missing_input_message(path, made_by))


def run_guarded(main: Callable[[], None], *, interrupted: Callable[[int], str], after_file_error: str) -> None:
    """Run a command's main() with what the user can fix as one line instead of a traceback.

    A PipelineError or a file-system error exits with status 2 and one line (a file-system error's ends with
    `after_file_error`); SIGINT and SIGTERM with 128 + the signal's number, as a shell reports them, and the line
    `interrupted(signum)`, which says what is kept and how to go on: that differs between a DVC stage and a command.
    """
    configure_logging()
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main()
    except PipelineError as error:
        log.error("%s", error)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        log.error("%s", interrupted(signum))
        sys.exit(128 + signum)
    except OSError as error:
        message = file_system_message(error, after_file_error)
        if message is None:
            raise
        log.debug("file-system error", exc_info=True)
        log.error("%s", message)
        sys.exit(2)


def run_command(main: Callable[[], None], *, name: str, on_interrupt: str) -> None:
    """Run a command that is not a DVC stage (`make review`, `make sweep`, ...): nothing is staged, and an
    interruption says what `on_interrupt` says of this command (`name`), not to rerun `dvc repro`."""
    run_guarded(main, interrupted=lambda signum: f"{name} was interrupted ({signal.Signals(signum).name}): "
                f"{on_interrupt}.", after_file_error=f"Then run {name} again.")


def run_stage(main: Callable[[], None], *, on_interrupt: str = "") -> None:
    """Run a stage's main() with its declared outs staged and replaced together only if it succeeds.

    Errors and interruptions as run_guarded says; an interruption's line says what is kept and how to go on
    (`on_interrupt`).
    """
    command = " ".join(["python", *sys.argv])
    stages = stage_map(sys.argv)
    group: io.OutsGroup | None = None

    def staged() -> None:
        nonlocal group
        check_inputs(stages)
        with io.outs_group(stages.outs) as group:
            main()

    run_guarded(staged, interrupted=lambda signum: interrupted_message(
        command, signum, bool(group and group.committed), on_interrupt),
        after_file_error=f"Nothing was replaced: {KEPT}. Then rerun `dvc repro`.")
