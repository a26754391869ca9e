"""What every stage script does around its own work: logging set-up and turning user errors into clear exits."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alpaca_qlora import io
from alpaca_qlora.errors import PipelineError

log = logging.getLogger("alpaca_qlora")

# Figures that depend on the machine, not on code, data and params: they go to metrics/timing/<stage>.json (a
# plain out, not a DVC metric), so `dvc metrics diff` of an unchanged pipeline on another machine lists no key.
# Figures of this machine and this call, not of the result: kept out of `dvc metrics diff`. A resumed run's
# `resumed_from_step` is one too, since its results equal an uninterrupted run's.
TIMING_KEYS = frozenset({"runtime_s", "generation_s", "new_tokens_per_s", "tokens_per_s", "labelled_tokens_per_s",
                         "peak_memory_gib", "peak_memory_kind", "resumed_from_step", "peak_memory_gib_per_process",
                         "load_peak_memory_gib_per_process", "host_peak_memory_gib_per_process"})
TIMING_DIR = Path("metrics/timing")


def split_timing(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, timing) of a flat metrics dict."""
    results = {key: value for key, value in metrics.items() if key not in TIMING_KEYS}
    timing = {key: value for key, value in metrics.items() if key in TIMING_KEYS}
    return results, timing


def timing_path(stage: str) -> Path:
    return TIMING_DIR / f"{stage}.json"


class EmptyInputError(PipelineError):
    """A stage's input holds no rows: its work (and every later stage's) would be empty or fail obscurely."""


def require_rows(rows: list[Any], what: str, fix: str) -> list[Any]:
    """`rows` unchanged, or an error saying that `what` is empty and how to fix it."""
    if not rows:
        raise EmptyInputError(f"{what} has no rows: {fix}")
    return rows


def read_input_rows(path: Path, made_by: str) -> list[dict[str, Any]]:
    """The rows of an input file that an earlier stage wrote, refusing an empty one."""
    return require_rows(io.read_jsonl(path), str(path),
                        f"rerun `dvc repro {made_by}` and read its log (it may have dropped every row).")


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("ALPACA_QLORA_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError exits with status 2 and its message, nothing half-written."""
    configure_logging()
    try:
        main()
    except PipelineError as error:
        log.error("%s", error)
        sys.exit(2)
