"""What dvc.yaml says about the stage being run: which stage a command line is, its outs, who makes its inputs.

The stage runner reads it so that dvc.yaml stays the one list of each stage's outs and inputs: the outs it stages
and replaces together, and the inputs it checks before the stage starts. The stage's params view
(alpaca_qlora/stage_params.py) reads the same parsed stages: dvc.yaml is parsed once per process.
"""
from __future__ import annotations

import functools
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DVC_FILE = "dvc.yaml"
OUT_KINDS = ("outs", "metrics", "plots")


@dataclass(frozen=True)
class StageMap:
    """The stages a command line runs (evaluate.py with no argument runs two), their outs and missing inputs."""

    names: tuple[str, ...]
    outs: tuple[str, ...]
    inputs: dict[str, str]  # an input another stage makes -> that stage

    def missing_inputs(self) -> dict[str, str]:
        return {path: maker for path, maker in self.inputs.items() if not Path(path).exists()}


def dvc_stages(dvc_file: str | Path = DVC_FILE) -> dict[str, Any]:
    """dvc.yaml's stages, {} where there is no dvc.yaml (a script run elsewhere). Parsed once per version of the
    file, however many readers a stage run has; the dict is shared, so callers only read it."""
    path = Path(dvc_file)
    if not path.is_file():
        return {}
    status = path.stat()
    return _parse_stages(str(path.resolve()), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=8)
def _parse_stages(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """The stages of the file at `path`; its modification time and size are the key that a new version misses."""
    return (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("stages", {})


def _paths(entries: list[Any]) -> list[str]:
    """The paths of a dvc.yaml list, whose entries are a path or {path: options}."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def stage_outs(stage: dict[str, Any]) -> list[str]:
    return [path for kind in OUT_KINDS for path in _paths(stage.get(kind, []))]


def _runs(cmd: Any, argv: list[str]) -> bool | None:
    """True: `cmd` is exactly this command line; None: it runs the same script with other arguments."""
    words = shlex.split(cmd) if isinstance(cmd, str) else []  # a launcher passes the script's absolute path
    if words[:1] != ["python"] or len(words) < 2 or Path(words[1]).resolve() != Path(argv[0]).resolve():
        return False
    return True if words[2:] == argv[1:] else None


def stage_map(argv: list[str], dvc_file: str | Path = DVC_FILE) -> StageMap:
    """The dvc.yaml stages this command line runs: the one whose cmd it is, else every stage of the same script.

    Empty where there is no dvc.yaml (a script run elsewhere): then nothing is staged and no input is checked.
    """
    stages = dvc_stages(dvc_file)
    matches = {name: _runs(stage.get("cmd"), argv) for name, stage in stages.items()}
    names = [name for name, match in matches.items() if match is True] or [
        name for name, match in matches.items() if match is None]
    makers = {out: name for name, stage in stages.items() for out in stage_outs(stage)}
    inputs = {dep: makers[dep] for name in names for dep in _paths(stages[name].get("deps", []))
              if dep in makers and makers[dep] not in names}
    return StageMap(names=tuple(names), outs=tuple(out for name in names for out in stage_outs(stages[name])),
                    inputs=inputs)
