"""One stop rule: generation (plain's StopOnMarker, the own loops' MarkerCheck), cleanup, the cut-by-limit metric
and the chat stream all end an answer at the same place, including at an indented marker line."""
from __future__ import annotations

import pytest
import torch

from alpaca_qlora.chat import AnswerStreamer
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.evaluation.metrics import cut_by_limit
from alpaca_qlora.generation.greedy import take_token
from alpaca_qlora.generation.stop_checks import MarkerCheck, StopOnMarker
from alpaca_qlora.stop_rule import clean_generation, stop_position

MARKERS = ALPACA.stop_markers


# Generated pieces (one token each) -> after how many tokens generation stops (None: never), and the answer.
CASES = [
    (["Paris", "\n", "  ", "###", " Instruction"], 4, "Paris"),         # indented marker line
    (["Paris", "\n", "\t", "###", " X"], 4, "Paris"),                    # tab-indented
    (["Use", " ###", " here", "."], None, "Use ### here."),              # inside a line it is text
    (["###", " Response", ":"], 1, ""),                                  # the text opens with a marker
    ([" ", "### ", "Input"], 2, ""),                                     # ... after a blank
    (["Paris", "\n", "###"], 3, "Paris"),                                # at the very end, without its blank
    (["Steps", ":\n", "####", " Step"], None, "Steps:\n#### Step"),      # a markdown h4 is not the marker
    (["a", "\n", "  #", "## more"], 4, "a"),                             # split across tokens
    (["one", "\n\n", "### ", "Instruction", ":"], 3, "one"),
]


class PieceTokenizer:
    """Each distinct piece of CASES is one token id; decoding joins the pieces."""

    def __init__(self, pieces):
        self.vocab = ["<prompt>", *dict.fromkeys(pieces)]

    def __len__(self):
        return len(self.vocab)

    def ids(self, pieces):
        return [self.vocab.index(piece) for piece in pieces]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab[i] for i in ids if i != 0)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(list(row)) for row in rows]


TOKENIZER = PieceTokenizer([piece for pieces, _, _ in CASES for piece in pieces])


def plain_stop(ids):
    """After how many tokens generate() with StopOnMarker stops the row."""
    check = StopOnMarker(TOKENIZER, 1, MARKERS)
    for count in range(1, len(ids) + 1):
        if check(torch.tensor([[0, *ids[:count]]]), None).item():
            return count
    return None


def loop_stop(ids, *, shortcut=True):
    """After how many tokens the own loops (take_token with MarkerCheck) stop the row."""
    check = MarkerCheck(TOKENIZER, MARKERS)
    if not shortcut:
        check.trigger_ids = None  # decode every row at every step
    generated, watched = [], False
    for token in ids:
        done, watched = take_token(generated, token, watched=watched, eos_token_id=-1, max_new_tokens=100,
                                   marker_check=check)
        if done:
            return len(generated)
    return None


@pytest.mark.parametrize(("pieces", "stop", "answer"), CASES)
def test_generation_stops_where_cleanup_cuts(pieces, stop, answer):
    ids = TOKENIZER.ids(pieces)
    assert plain_stop(ids) == stop
    assert loop_stop(ids) == stop
    assert loop_stop(ids, shortcut=False) == stop  # the '#'-token shortcut decides exactly as decoding every step
    raw = "".join(pieces[:stop])  # what generation leaves
    assert clean_generation(raw, MARKERS) == answer
    assert cut_by_limit(raw, stopped_by_eos=False, new_tokens=len(pieces), max_new_tokens=len(pieces),
                        stop_markers=MARKERS) == (stop is None)
    if stop is not None:  # the text holds a stop only from its last token on: generation stopped at once
        assert stop_position(raw, MARKERS) is not None and stop_position(raw[:-len(pieces[stop - 1])], MARKERS) is None
    written = []
    streamer = AnswerStreamer(TOKENIZER, MARKERS, written.append)
    streamer.put(torch.tensor([[0]]))
    for token in ids[:stop]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(written) == streamer.answer == answer
