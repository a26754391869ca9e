"""Set params.yaml keys where `dvc exp run -S` is not available (the GPU machine has no DVC):

    python -m bench.set_params model.name=/tmp/mistral-7b-random train.liger_kernels=true

Values are read as YAML, like `-S` reads them; the result is validated before it is written.
"""
from __future__ import annotations

import sys

import yaml

from alpaca_qlora import io
from alpaca_qlora.config import params_from_mapping


def main(assignments: list[str]) -> None:
    params = yaml.safe_load(open("params.yaml", encoding="utf-8"))
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        section, _, name = key.partition(".")
        params.setdefault(section, {})[name] = yaml.safe_load(value)
    params_from_mapping(params)
    io.write_text("params.yaml", yaml.safe_dump(params, sort_keys=False))


if __name__ == "__main__":
    main(sys.argv[1:])
