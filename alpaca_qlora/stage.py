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
