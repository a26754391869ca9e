"""Set params.yaml keys where `dvc exp run -S` is not available (the GPU machine has no DVC): a profile's keys, then
key=value overrides, validated before anything is written.

    python -m bench.set_params [--profile profiles/mistral-7b.yaml] model.name=/tmp/mistral-7b-random

Values are read as YAML, like `-S` reads them.
"""
from __future__ import annotations

import argparse

import yaml

from alpaca_qlora import io
from alpaca_qlora.config import PARAMS_FILE, params_from_mapping
from alpaca_qlora.profiles import merged, read_profile, read_yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="a profile to apply first, e.g. profiles/mistral-7b.yaml")
    parser.add_argument("assignments", nargs="*", metavar="key=value")
    arguments = parser.parse_args()
    params = read_yaml(PARAMS_FILE)
    if arguments.profile:
        params = merged(params, read_profile(arguments.profile))
    overrides: dict[str, dict] = {}
    for assignment in arguments.assignments:
        key, _, value = assignment.partition("=")
        section, _, name = key.partition(".")
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    params = merged(params, overrides)
    params_from_mapping(params)
    io.write_text(PARAMS_FILE, yaml.safe_dump(params, sort_keys=False))


if __name__ == "__main__":
    main()
