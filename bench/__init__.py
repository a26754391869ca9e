"""GPU measurements of the project's code paths; run from the project root as modules (`python -m bench.train_bench`)
so they import each other, alpaca_qlora and support/ without editing sys.path."""

import sys
from pathlib import Path


def command_line() -> str:
    """This run's command for a results file, the script and any argument under the project root relative to it (a
    family's --profile), so a committed JSON names no machine's directories."""
    root = Path(__file__).resolve().parents[1]

    def relative(argument: str) -> str:
        path = Path(argument)
        return str(path.resolve().relative_to(root)) if path.is_absolute() and path.resolve().is_relative_to(root) \
            else argument

    script = Path(sys.argv[0]).resolve()
    name = str(script.relative_to(root)) if script.is_relative_to(root) else sys.argv[0]
    return " ".join([name, *map(relative, sys.argv[1:])])
