"""The per-stage view of params.yaml: a stage reads only the keys its dvc.yaml entry declares.

That keeps DVC's invalidation exactly right: reading an undeclared key raises instead of silently making the stage
depend on something DVC doesn't track, so `dvc exp run -S lora.r=32` reruns train and what follows and nothing else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_qlora.config import PARAMS_FILE, ConfigError, Params, load_params
from alpaca_qlora.stage_map import DVC_FILE, dvc_stages


def declared_params(stage: str, dvc_file: str | Path = DVC_FILE) -> tuple[str, ...]:
    """The dotted param keys that `dvc.yaml` declares for `stage` (the `do:` body of a foreach stage included)."""
    stages = dvc_stages(dvc_file)
    if stage not in stages:
        raise ConfigError(f"{dvc_file} has no stage '{stage}'; stages: {', '.join(stages) or 'none'}.")
    body = stages[stage].get("do", stages[stage])
    keys: list[str] = []
    for entry in body.get("params", []) or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif entry == {PARAMS_FILE: None}:  # the whole file (check_params)
            keys.extend(f.name for f in dataclasses.fields(Params))
        elif isinstance(entry, dict):  # {other_file.yaml: [keys]} is not used by this project
            raise ConfigError(f"dvc.yaml stage '{stage}': params from other files are not supported: {entry}.")
    return tuple(keys)


class _SectionView:
    """Attribute access to one params section, limited to the keys a stage declared."""

    def __init__(self, stage: str, section: str, values: Any, allowed: set[str]):
        self._stage, self._section, self._values, self._allowed = stage, section, values, allowed

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._allowed:
            raise AttributeError(
                f"stage '{self._stage}' reads {self._section}.{name} but dvc.yaml does not declare it: "
                f"add it to the stage's params so DVC reruns the stage when it changes."
            )
        return getattr(self._values, name)


@dataclass(frozen=True)
class StageParams:
    """What one stage may read: `params.data.template` works only if dvc.yaml lists `data.template`."""

    stage: str
    keys: tuple[str, ...]
    data: Any
    model: Any
    lora: Any
    train: Any
    eval: Any


def stage_params(stage: str, params_file: str | Path = PARAMS_FILE, dvc_file: str | Path = DVC_FILE) -> StageParams:
    params = load_params(params_file)
    keys = declared_params(stage, dvc_file)
    allowed: dict[str, set[str]] = {f.name: set() for f in dataclasses.fields(Params)}
    for key in keys:
        section, _, name = key.partition(".")
        if section not in allowed or (name and not hasattr(getattr(params, section), name)):
            raise ConfigError(f"dvc.yaml stage '{stage}' declares param '{key}', which params.yaml's schema lacks.")
        if name:
            allowed[section].add(name)
        else:  # the whole section
            allowed[section].update(f.name for f in dataclasses.fields(getattr(params, section)))
    views = {
        section: _SectionView(stage, section, getattr(params, section), names) for section, names in allowed.items()
    }
    return StageParams(stage=stage, keys=keys, **views)


__all__ = ["StageParams", "declared_params", "stage_params"]
