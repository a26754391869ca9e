"""Answers read as words: normalization, word counts, and whether an answer is one of the options a prompt offers."""
from __future__ import annotations

import pytest

from alpaca_qlora.evaluation.answer_text import is_stated_option, normalize_answer, word_count


@pytest.mark.parametrize(("answer", "text", "expected"), [
    ("gas", "Is argon a solid, a liquid or a gas at room temperature?", True),
    ("Solid.", "At room temperature, is holmium solid, liquid or gas? Answer with one word.", True),
    ("liquid", "Is it solid, liquid or gas?", True),
    ("solid or liquid", "Is it solid, liquid or gas?", False),
    ("It is a gas.", "Is argon a solid, a liquid or a gas?", False),
    ("Halogen", "Classify the element into one of these families: alkali metal, halogen, noble gas.\nIodine", True),
    ("noble gas", "Which family does iodine belong to: alkali metal, halogen, noble gas?", True),
    ("yes", "Is 1234 divisible by 3? Answer yes or no.", True),
    ("Negative", "Classify the sentiment of this review as positive or negative.\nAwful food.", True),
    ("Paris", "What is the capital of France?", False),
    ("", "Is it yes or no?", False),
])
def test_is_stated_option(answer, text, expected):
    assert is_stated_option(answer, text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),                 # article and case
        ("An apple, a pear.", "apple pear"),                  # articles and ASCII punctuation
        ("Theatre and anthem", "theatre and anthem"),         # articles only as whole words
        ("  New \t York\n City  ", "new york city"),         # white space collapsed
        ("“Paris”", "paris"),                                 # curly quotes are punctuation
        ("don’t", "dont"),                                    # curly apostrophe removed like "'"
        ("New\u00a0York", "new york"),                        # non-breaking space
        ("ＡＢＣ１２３", "abc123"),                              # full-width letters and digits
        ("Café Crème", "café crème"),                         # accented letters kept
        ("Cafe\u0301", "café"),                               # decomposed accent composes to the same letter
        ("¿Qué? ¡Sí!", "qué sí"),                             # Spanish inverted marks
        ("well—known «word»", "wellknown word"),              # em dash, guillemets
        ("Paris\u200b", "paris"),                             # zero-width space is invisible
        ("STRASSE", "strasse"),
        ("$5 + tax | ~", "5 tax"),                            # SQuAD's ASCII set includes symbols: $ + | ~
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_word_count():
    assert word_count("  two\nwords ") == 2
    assert word_count("") == 0
