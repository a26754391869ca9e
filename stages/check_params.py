"""check_params: validate all of params.yaml, so an unknown key stops the pipeline whichever stage would read it.

Every stage validates the whole file when it runs, but DVC reruns a stage only when a param it declares changes:
a typo such as `-S +data.smaple_frac=0.5` changes no stage's params, so nothing would run and nothing would fail.
This stage declares the whole file (and writes nothing), so DVC runs it on any change to params.yaml.
"""
from __future__ import annotations

import logging

import _venv_check  # noqa: F401 (first: says to activate the venv when a package is missing)

from alpaca_qlora.config import load_params
from alpaca_qlora.stage import run_stage

log = logging.getLogger("check_params")


def main() -> None:
    load_params()
    log.info("params.yaml is valid")


if __name__ == "__main__":
    run_stage(main)
