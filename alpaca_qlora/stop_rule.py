"""Where a generated answer ends: the one stop rule that generation, cleanup, metrics and chat all apply.

A model that goes on with "\\n\\n### Instruction:" has finished its answer and started inventing the next prompt;
that continuation must count neither for nor against it. A stop marker ends the answer where it opens a line,
indented or not, the text's first line included; inside a line ("use ### here") it is text. At the very end of
the text the marker's trailing blank may be missing: generation stops as soon as the marker's visible part has
appeared, so the raw text it leaves ends there, and the cleanup must cut that text where generation stopped.

Pure string functions (no torch), so the metrics and the light stages that import them stay light.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Sequence


@functools.lru_cache(maxsize=64)
def stop_pattern(marker: str) -> re.Pattern[str]:
    """The marker at the start of a line after optional spaces or tabs, followed by its trailing blank or the end."""
    head = marker.rstrip()
    if not head:
        raise ValueError(f"stop marker {marker!r} is blank: it would cut every answer at its first line.")
    tail = marker[len(head):]
    ending = f"(?:{re.escape(tail)}|\\Z)" if tail else ""
    return re.compile(rf"^[ \t]*{re.escape(head)}{ending}", re.MULTILINE)


def stop_position(text: str, stop_markers: Sequence[str]) -> int | None:
    """Where the first stop marker's line starts in `text` (the answer ends there), or None if none does."""
    found = [match.start() for marker in stop_markers if (match := stop_pattern(marker).search(text))]
    return min(found) if found else None


def clean_generation(raw: str, stop_markers: Sequence[str]) -> str:
    """The answer inside a raw generation: the text before its stop, stripped."""
    cut = stop_position(raw, stop_markers)
    return raw[:cut].strip()


def may_become_stop(line: str, stop_markers: Sequence[str]) -> bool:
    """Whether an unfinished last line could still grow into a stop marker's line (a streamer holds it back)."""
    start = line.lstrip(" \t")
    return any(marker.strip().startswith(start) for marker in stop_markers)
