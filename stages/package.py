"""package: the adapter as shipped, models/release/ = the adapter's files + its card completed by the evaluation.

The card's eval table needs metrics/compare.json, which exists only after train's adapter has been evaluated;
DVC lets one stage write an out, so this last stage writes the release rather than train rewriting its adapter.
"""
from __future__ import annotations

import logging
from pathlib import Path

import _venv_check  # noqa: F401 (first: says to activate the venv when a package is missing)

from alpaca_qlora import io
from alpaca_qlora.adapter import package_release
from alpaca_qlora.stage import run_stage

ADAPTER_IN = Path("models/adapter")
COMPARE_IN = Path("metrics/compare.json")
RELEASE_OUT = Path("models/release")

log = logging.getLogger("package")


def main() -> None:
    package_release(ADAPTER_IN, RELEASE_OUT, io.read_json(COMPARE_IN))
    log.info("release in %s: adapter, tokenizer with the training prompt, prompt_template.json, card with the eval "
             "table", RELEASE_OUT)


if __name__ == "__main__":
    run_stage(main)
