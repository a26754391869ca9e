"""A scratch DVC project holding the project's files and a tiny params.yaml, as a fresh clone has them: what the
tests that run the real stages through `dvc repro` start from."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from support import ROOT
from support.commands import dvc, run


def tiny_params(model_dir: str | Path, **sections: dict[str, Any]) -> dict:
    """params.yaml at test size on `model_dir`, with `sections`' keys on top (e.g. train={"max_steps": 1})."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(sample_frac=0.02, eval_size=12)
    params["model"].update(name=str(model_dir), quantization="none")
    params["train"].update(max_steps=2, micro_batch_size=4, gradient_accumulation_steps=1, max_seq_length=256,
                           logging_steps=1, save_steps=100)
    params["eval"].update(max_new_tokens=6, batch_size=8, num_examples=2)
    for section, keys in sections.items():
        params[section].update(keys)
    return params


def make_project(path: Path, params: dict) -> Path:
    """A git + DVC repository at `path` with the stages, the package and `params`, committed."""
    for name in ("alpaca_qlora", "stages"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, path / name)
    (path / "data" / "external").mkdir(parents=True)
    shutil.copy(ROOT / "data" / "external" / "README.md", path / "data" / "external" / "README.md")
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], cwd=path)
    run(["git", "config", "user.email", "test@example.com"], cwd=path)
    run(["git", "config", "user.name", "test"], cwd=path)
    dvc("init", "-q", cwd=path)
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")  # the committed default remote
    run(["git", "add", "-A"], cwd=path)
    run(["git", "commit", "-qm", "project"], cwd=path)  # as in a clone; DVCLive needs a commit to start from
    return path
