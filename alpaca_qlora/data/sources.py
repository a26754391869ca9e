"""Where rows come from: the bundled set, the Hugging Face hub (the real profile), or a file in data/external/."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_qlora.errors import PipelineError

log = logging.getLogger(__name__)

OFFLINE_ALTERNATIVES = (
    "Offline alternatives: data.source=bundled (the default, ships with the project), or data.source=local with "
    "data.path pointing at an Alpaca-format .json/.jsonl/.parquet file (e.g. a copy of alpaca_data_cleaned.json "
    "placed in data/external/)."
)
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
EXTERNAL_DIR = "data/external"  # a dependency of the fetch stage in dvc.yaml


class SourceUnavailableError(PipelineError):
    """The data source could not be reached or read."""


@dataclass(frozen=True)
class SourceFile:
    path: Path
    description: dict[str, Any]


def hub_file(hub_id: str, filename: str, revision: str) -> SourceFile:
    """Download (or reuse from the HF cache) one file of a hub dataset; record the commit it resolved to."""
    from huggingface_hub import hf_hub_download

    try:
        local = Path(hf_hub_download(repo_id=hub_id, filename=filename, repo_type="dataset", revision=revision))
    except Exception as error:  # connection, offline-mode and not-found errors come as many types
        raise SourceUnavailableError(
            f"could not get {filename} of dataset {hub_id}@{revision} from the Hugging Face hub "
            f"({type(error).__name__}: {error}). {OFFLINE_ALTERNATIVES}"
        ) from error
    commit = local.parent.name if _COMMIT_SHA.match(local.parent.name) else None
    if not _COMMIT_SHA.match(revision):
        log.warning(
            "data.hub_revision=%r is not a commit: the data may change under you. Pin it to %s for reproducibility.",
            revision, commit or "the commit sha shown on the hub",
        )
    return SourceFile(local, {"source": "hub", "hub_id": hub_id, "revision": revision, "resolved_commit": commit})


def local_file(path: str) -> SourceFile:
    """A file under data/external/, the folder the fetch stage declares as a dependency.

    DVC reruns fetch only when a dependency changes, and it can see neither a URL nor a file elsewhere: such a
    source would be read once and its later changes ignored. `dvc import-url` makes either a DVC-tracked file
    here, and `dvc update` rechecks it.
    """
    if re.match(r"^[a-z][a-z0-9+.-]*://", path, flags=re.IGNORECASE):
        name = Path(path.split("?", 1)[0]).name or "rows.json"
        raise SourceUnavailableError(
            f"data.path={path!r} is a URL, whose changes DVC cannot see (fetch would keep the first rows it read). "
            f"Import it as a tracked file and point data.path at that: `dvc import-url {path} "
            f"{EXTERNAL_DIR}/{name}` then `-S data.path={EXTERNAL_DIR}/{name}`; `dvc update "
            f"{EXTERNAL_DIR}/{name}.dvc` rechecks the URL later."
        )
    if not Path(os.path.abspath(path)).is_relative_to(os.path.abspath(EXTERNAL_DIR)):
        name = Path(path).name
        raise SourceUnavailableError(
            f"data.path={path!r} lies outside {EXTERNAL_DIR}/, where DVC cannot see it change (fetch would keep "
            f"the first rows it read). Copy it there (`cp {path} {EXTERNAL_DIR}/`) or import it, which also lets "
            f"`dvc update` recheck it: `dvc import-url {path} {EXTERNAL_DIR}/{name}`; then "
            f"`-S data.path={EXTERNAL_DIR}/{name}`."
        )
    if not Path(path).is_file():
        raise SourceUnavailableError(
            f"data.path={path!r} is not a file. Put an Alpaca-format .json/.jsonl/.parquet file in "
            f"{EXTERNAL_DIR}/ and give its path relative to the project root."
        )
    return SourceFile(Path(path), {"source": "local", "path": path})
