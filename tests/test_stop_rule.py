"""Where an answer ends: at a stop marker that opens a line, indented or not, never inside a line. Generation,
cleanup, the cut-by-limit metric and the chat stream all end an answer there (tests/generation/test_stop_checks.py,
tests/generation/test_generate.py)."""
from __future__ import annotations

import pytest

from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.stop_rule import clean_generation, stop_position

MARKERS = ALPACA.stop_markers


@pytest.mark.parametrize(("text", "position"), [
    ("Paris\n  ### Input:", 6), ("Paris\n\t### X", 6), ("### Response:", 0), ("Paris\n###", 6),
    ("Use ### here", None), ("Steps:\n#### Step 1", None), ("Paris\n###Instruction", None), ("", None),
])
def test_stop_position_is_where_a_marker_opens_a_line(text, position):
    assert stop_position(text, MARKERS) == position


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Paris\n\n### Instruction:\nName a city.", "Paris"),   # the model started inventing the next prompt
        ("  Paris  ", "Paris"),
        ("Use ### here to mark it.", "Use ### here to mark it."),  # mid-line markers are text
        ("### Response:\nParis", ""),                           # marker opens the text
        ("Paris\n  ### Input:", "Paris"),                       # indented marker line
        ("Paris\n###", "Paris"),                                # generation stopped on the marker's visible part
        ("Steps:\n#### Step 1\nmix", "Steps:\n#### Step 1\nmix"),  # a markdown h4 is not the marker
        ("", ""),
    ],
)
def test_clean_generation(raw, expected):
    assert clean_generation(raw, MARKERS) == expected


def test_clean_generation_cuts_at_the_earliest_of_several_markers():
    assert clean_generation("one\nEND\ntwo\n### three", ("### ", "END")) == "one"
    with pytest.raises(ValueError, match="blank"):
        clean_generation("text", ("  ",))
