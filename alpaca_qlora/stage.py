"""What every stage script does around its own work: logging set-up and turning user errors into clear exits."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from alpaca_qlora.errors import PipelineError

log = logging.getLogger("alpaca_qlora")


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
