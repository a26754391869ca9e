"""Alpaca-shaped rows: reading source files, validating rows, de-duplicating, and the key used for leakage checks."""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alpaca_qlora.errors import PipelineError

REQUIRED_FIELDS = ("instruction", "input", "output")


class DataFormatError(PipelineError, ValueError):
    """The source is not Alpaca-shaped at all (not JSON, wrong columns); the message says what was found."""


@dataclass
class ValidationReport:
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"rows_read": self.read, "rows_kept": self.kept, "rows_dropped": dict(sorted(self.dropped.items()))}


def read_rows(path: str | Path) -> list[Any]:
    """Read a .json (array or JSON lines), .jsonl or .parquet file into a list of raw rows."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as parquet  # installed with `datasets`

        try:
            return parquet.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several unrelated types for a bad file
            raise DataFormatError(f"{path}: not a readable parquet file ({error}).") from error
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some Windows editors write, is not data
    except UnicodeDecodeError as error:
        raise DataFormatError(
            f"{path}: not UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start}); save it as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 {path} > fixed{suffix}` for a Latin-1 file.") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if data is not None:
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataFormatError(f"{path}: expected a JSON array of rows, found a {type(data).__name__}.")
            return data
    elif suffix != ".jsonl":
        raise DataFormatError(f"{path}: unsupported file type '{suffix}'; use .json, .jsonl or .parquet.")
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataFormatError(
                f"{path}:{line_number}: not JSON ({error.msg}); expected a JSON array or one JSON object per line."
            ) from None
    return rows


def check_alpaca_shape(rows: list[Any], source: str) -> None:
    """Refuse a file whose rows are not Alpaca-shaped at all, rather than dropping every row one by one."""
    if not rows:
        raise DataFormatError(f"{source}: no rows found.")
    objects = [row for row in rows if isinstance(row, dict)]
    if not objects:
        raise DataFormatError(f"{source}: rows are not JSON objects; expected objects with {REQUIRED_FIELDS}.")
    if not any(all(name in row for name in REQUIRED_FIELDS) for row in objects):
        columns = sorted({key for row in objects[:100] for key in row})
        raise DataFormatError(
            f"{source}: not Alpaca-shaped: no row has all of {', '.join(REQUIRED_FIELDS)}; "
            f"columns found: {', '.join(columns) or 'none'}. Rename the columns or choose another data.source."
        )


def row_problem(row: Any) -> str | None:
    """Why a row can't be used (a metrics key naming the field at fault), or None if it is fine."""
    if not isinstance(row, dict):
        return "not_an_object"
    for name in REQUIRED_FIELDS:
        if name not in row:
            return f"missing_{name}"
    for name in REQUIRED_FIELDS:
        if not isinstance(row[name], str) and not (name == "input" and row[name] is None):
            return f"non_string_{name}"
    if "task_type" in row and row["task_type"] is not None and not isinstance(row["task_type"], str):
        return "non_string_task_type"
    if not row["instruction"].strip():
        return "empty_instruction"
    if not row["output"].strip():
        return "empty_output"
    return None


def row_id(row: dict[str, str]) -> str:
    """A content id, stable under re-ordering of the source, used to join predictions across models."""
    payload = "\x1f".join(row[name] for name in REQUIRED_FIELDS)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def clean_rows(rows: Iterable[Any]) -> tuple[list[dict[str, str]], ValidationReport]:
    """Keep valid rows (with an `id`), drop invalid ones and exact duplicates, counting each reason."""
    report = ValidationReport()
    kept: list[dict[str, str]] = []
    seen: set[str] = set()
    for row in rows:
        report.read += 1
        problem = row_problem(row)
        if problem is not None:
            report.dropped[problem] += 1
            continue
        clean = {name: row[name] for name in REQUIRED_FIELDS}
        clean["input"] = clean["input"] or ""  # null input means none, as alpaca-cleaned's consumers read it
        if row.get("task_type"):
            clean["task_type"] = row["task_type"]
        identifier = row_id(clean)
        if identifier in seen:
            report.dropped["duplicate"] += 1
            continue
        seen.add(identifier)
        kept.append({"id": identifier, **clean})
    report.kept = len(kept)
    return kept, report


_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def prompt_key(row: dict[str, str]) -> str:
    """Two rows with the same key ask the same question: one may not be trained on while the other is evaluated."""
    return normalize_text(row["instruction"]) + "\x1f" + normalize_text(row["input"])
