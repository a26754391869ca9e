"""Profiles: a YAML overlay on params.yaml (profiles/<name>.yaml), applied as `dvc exp run -S key=value` flags.

params.yaml is the embedded profile and holds every default; a profile lists only the keys it changes, so each value
is written once. The overlay is merged over params.yaml and validated (config.params_from_mapping) before any flag is
made, and each flag carries the validated value, so a typo fails here, naming the key, not midway through a run.

    python -m alpaca_qlora.profiles profiles/mistral-7b.yaml                                 # print the flags
    python -m alpaca_qlora.profiles profiles/mistral-7b.yaml -- dvc exp run --name mistral-7b  # run with them
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from alpaca_qlora.config import PARAMS_FILE, ConfigError, Params, params_from_mapping

log = logging.getLogger(__name__)

Overlay = dict[str, dict[str, Any]]


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; profiles live in profiles/ and params.yaml in the project root.")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error


def read_profile(path: str | Path) -> Overlay:
    """The profile's sections of keys; its values are checked when merged (profile_params)."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict) or not all(isinstance(values, dict) for values in raw.values()):
        raise ConfigError(f"profile {path}: expected sections (data, model, lora, train, eval) of key: value lines.")
    return raw


def merged(base: Mapping[str, Any], overlay: Overlay) -> dict[str, Any]:
    """base with the overlay's keys replaced, section by section (a listed key replaces, never merges, a list)."""
    result = {section: dict(values or {}) for section, values in base.items()}
    for section, values in overlay.items():
        result.setdefault(section, {}).update(values)
    return result


def profile_params(profile: str | Path, params_file: str | Path = PARAMS_FILE) -> Params:
    """The params a run of this profile reads: params.yaml with the profile's keys, validated."""
    return params_from_mapping(merged(read_yaml(params_file) or {}, read_profile(profile)))


def flag_value(value: Any) -> str:
    """A validated value as DVC's `-S` (Hydra's override grammar) reads it back: true, 0.0002, [q_proj,v_proj]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(flag_value(item) for item in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    plain = text and all(char.isalnum() or char in "/._-" for char in text) and yaml.safe_load(text) == text
    return text if plain else repr(text)  # quoted where it would read as a number, a boolean or null, or not parse


def set_param_flags(profile: str | Path, params_file: str | Path = PARAMS_FILE) -> list[str]:
    """`-S key=value` for every key the profile lists, in its order, with the validated (typed) values."""
    params = profile_params(profile, params_file)
    flags = []
    for section, values in read_profile(profile).items():
        for name in values:
            flags += ["-S", f"{section}.{name}={flag_value(getattr(getattr(params, section), name))}"]
    return flags


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description="Apply a profile (a YAML overlay on params.yaml) as -S flags.")
    parser.add_argument("profile", type=Path, help="e.g. profiles/mistral-7b.yaml")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    flags = set_param_flags(args.profile)
    if not command:
        print(shlex.join(flags))
        return
    log.info("%s", shlex.join(command + flags))
    os.execvp(command[0], command + flags)


if __name__ == "__main__":
    from alpaca_qlora.stage import configure_logging

    configure_logging()
    main()
