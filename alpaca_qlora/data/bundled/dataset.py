"""The bundled data set: every task's rows from one seeded generator, shuffled, checked against the set's contract.

Bump BUNDLED_VERSION whenever the output changes, so a changed data set is visible in metrics/data.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from alpaca_qlora import io
from alpaca_qlora.data.bundled.classification import classification_rows
from alpaca_qlora.data.bundled.closed_qa import closed_qa_rows
from alpaca_qlora.data.bundled.facts import load_facts
from alpaca_qlora.data.bundled.factual import factual_rows
from alpaca_qlora.data.bundled.open_ended import open_ended_rows
from alpaca_qlora.data.bundled.rows import OPEN_ENDED_WORDS, TASK_TYPES, Row, is_short
from alpaca_qlora.data.records import prompt_key
from alpaca_qlora.evaluation.answer_text import word_count

log = logging.getLogger(__name__)

BUNDLED_VERSION = "2"
SEED = 20240229


def check_rows(rows: Sequence[Row]) -> None:
    """Refuse to ship a set that breaks its own contract (a bug here would otherwise surface as odd metrics)."""
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        if row["task_type"] not in TASK_TYPES or not row["instruction"].strip() or not row["output"].strip():
            raise ValueError(f"bundled row {index} is malformed: {row}")
        if row["task_type"] != "open_ended" and not is_short(row["output"]):
            raise ValueError(f"bundled row {index} has a short-answer task type but a long output: {row}")
        low, high = OPEN_ENDED_WORDS
        if row["task_type"] == "open_ended" and not low <= word_count(row["output"]) <= high:
            raise ValueError(f"bundled row {index} is open-ended but {word_count(row['output'])} words long: {row}")
        key = prompt_key(row)
        if key in seen:
            raise ValueError(f"bundled rows {seen[key]} and {index} ask the same prompt: {row['instruction']!r}")
        seen[key] = index


def generate_rows() -> list[Row]:
    """The bundled data set: identical for identical code and package versions."""
    facts = load_facts()
    rng = random.Random(SEED)
    rows = factual_rows(facts, rng) + closed_qa_rows(facts, rng) + classification_rows(facts, rng)
    rows += open_ended_rows(facts, rng)
    rng.shuffle(rows)
    check_rows(rows)
    log.debug("bundled rows by task type: %s", dict(sorted(Counter(row["task_type"] for row in rows).items())))
    return rows


def render_rows(rows: Sequence[Row]) -> str:
    return json.dumps(list(rows), indent=2, ensure_ascii=False) + "\n"


def write_rows(path: str | Path) -> int:
    """Write the bundled set as a JSON array (atomically); return the number of rows."""
    rows = generate_rows()
    io.write_text(path, render_rows(rows))
    return len(rows)


def main(argv: Sequence[str] | None = None) -> None:
    from alpaca_qlora.stage import configure_logging

    parser = argparse.ArgumentParser(description="Write the bundled Alpaca-format data set as a JSON array.")
    parser.add_argument("out", type=Path, help="where to write the JSON file")
    args = parser.parse_args(argv)
    configure_logging()
    count = write_rows(args.out)
    log.info("wrote %d rows (bundled data set version %s) to %s", count, BUNDLED_VERSION, args.out)

