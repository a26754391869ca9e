"""The project's profiles as tests and bench read them, with a test's own keys on top: one set of defaults.

params.yaml is the embedded profile and sets every key; profiles/mistral-7b.yaml is the Mistral overlay on it. A
test changes only the keys it is about, and the result is validated as a run's params are, so a test cannot build
on values that neither profile uses.

    embedded_params(train={"max_steps": 2}).train
    mistral_params().lora
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from alpaca_qlora.config import Params, params_from_mapping
from alpaca_qlora.profiles import merged, read_profile, read_yaml
from support import ROOT

PARAMS_FILE = ROOT / "params.yaml"
MISTRAL_PROFILE = ROOT / "profiles" / "mistral-7b.yaml"


def embedded_params(**overrides: dict[str, Any]) -> Params:
    """params.yaml with the given keys replaced, section by section (e.g. train={"max_steps": 2})."""
    return params_from_mapping(merged(read_yaml(PARAMS_FILE), overrides))


def mistral_params(**overrides: dict[str, Any]) -> Params:
    """The Mistral profile (params.yaml + profiles/mistral-7b.yaml) with the given keys replaced."""
    return params_from_mapping(merged(merged(read_yaml(PARAMS_FILE), read_profile(MISTRAL_PROFILE)), overrides))


def write_embedded_params(path: Path, **overrides: dict[str, Any]) -> Params:
    """Write a complete params.yaml (the embedded profile with the given keys) for a command that reads one."""
    params = embedded_params(**overrides)  # validated first, so a test never writes a file a run would refuse
    path.write_text(yaml.safe_dump(merged(read_yaml(PARAMS_FILE), overrides), sort_keys=False), encoding="utf-8")
    return params
