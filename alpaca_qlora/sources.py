"""Where rows come from: the bundled set, the Hugging Face hub (the real profile), or a local file or URL."""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
import urllib.error
import urllib.request
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


def local_file(path_or_url: str, download_dir: Path) -> SourceFile:
    """A local path (relative to the project root) or an http(s) URL, downloaded whole before it is read."""
    if re.match(r"^https?://", path_or_url):
        suffix = Path(path_or_url.split("?", 1)[0]).suffix or ".json"
        download_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=download_dir, suffix=suffix, delete=False) as handle:
            target = Path(handle.name)
        try:
            with urllib.request.urlopen(path_or_url, timeout=60) as response, target.open("wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as error:
            target.unlink(missing_ok=True)
            raise SourceUnavailableError(f"could not download {path_or_url}: {error}. {OFFLINE_ALTERNATIVES}") from error
        return SourceFile(target, {"source": "url", "url": path_or_url})
    path = Path(path_or_url)
    if not path.is_file():
        raise SourceUnavailableError(
            f"data.path={path_or_url!r} is not a file. Give a path relative to the project root (files under "
            f"data/external/ are tracked by DVC) or an http(s) URL."
        )
    if not path.resolve().is_relative_to(Path("data/external").resolve()):
        log.warning("%s lies outside data/external/: DVC will not notice when its content changes.", path)
    return SourceFile(path, {"source": "local", "path": path_or_url})
