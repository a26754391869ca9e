"""fetch: get Alpaca-format rows from the configured source, validate and de-duplicate them.

Outs: data/raw/rows.jsonl (valid, unique rows with a content id) and metrics/data.json (source, file sha256,
counts per drop reason).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import _venv_check  # noqa: F401 (first: says to activate the venv when a package is missing)

from alpaca_qlora import io
from alpaca_qlora.data import bundled
from alpaca_qlora.data.records import DataFormatError, check_alpaca_shape, clean_rows, read_rows
from alpaca_qlora.data.sources import hub_file, local_file
from alpaca_qlora.stage import run_stage
from alpaca_qlora.stage_params import stage_params

ROWS_OUT = Path("data/raw/rows.jsonl")
METRICS_OUT = Path("metrics/data.json")

log = logging.getLogger("fetch")


def main() -> None:
    params = stage_params("fetch")
    data = params.data
    with tempfile.TemporaryDirectory() as scratch:
        if data.source == "bundled":
            source = Path(scratch) / "bundled.json"
            bundled.write_rows(source)
            description = {"source": "bundled", "bundled_version": bundled.BUNDLED_VERSION}
        elif data.source == "hub":
            found = hub_file(data.hub_id, data.hub_file, data.hub_revision)
            source, description = found.path, found.description
        else:
            found = local_file(data.path)
            source, description = found.path, found.description
        description["sha256"] = io.sha256_file(source)
        raw_rows = read_rows(source)
    check_alpaca_shape(raw_rows, str(description.get("path") or source.name))
    rows, report = clean_rows(raw_rows)
    if not rows:
        raise DataFormatError(f"no valid rows: every row was dropped ({dict(report.dropped)}).")
    io.write_jsonl(ROWS_OUT, rows)
    io.write_json(METRICS_OUT, {**description, **report.as_dict()})
    log.info("kept %d of %d rows; dropped %s", report.kept, report.read, dict(report.dropped) or "none")


if __name__ == "__main__":
    run_stage(main)
