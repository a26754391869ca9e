"""GPU measurements of the project's code paths; run from the project root as modules (`python -m bench.train_bench`)
so they import each other, alpaca_qlora and support/ without editing sys.path."""

import sys
from pathlib import Path


def command_line() -> str:
    """This run's command for a results file, the script's path relative to the project root, so a committed JSON
    names no machine's directories."""
    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parents[1]
    name = str(script.relative_to(root)) if script.is_relative_to(root) else sys.argv[0]
    return " ".join([name, *sys.argv[1:]])
