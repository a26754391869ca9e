"""Answers, references and prompts read as words, the way every metric reads them.

SQuAD's answer normalization made unicode-aware, word counts (the bundled data counts its short answers with the
same rule EM uses), content words (stop words dropped) and the options a prompt offers. Pure functions of text.
"""
from __future__ import annotations

import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Dropped before tokenizing: SQuAD's ASCII punctuation (which includes symbols such as $ + < = > | ~ that unicode
# files under S*, not P*), every unicode punctuation character (P*), and invisible format characters (Cf:
# zero-width space, soft hyphen, byte-order mark) that models and scraped references carry and no reader sees.
_DROPPED_CHARACTERS = frozenset(string.punctuation)
_DROPPED_CATEGORIES = ("P", "Cf")

# Function words that carry no fact. Negations and yes/no are deliberately absent: "no" can be the whole answer,
# and an answer that drops the "not" of its reference says the opposite.
STOP_WORDS = frozenset(
    """
    a an the and or but if then else so than as of to in on at by for with from into onto over under about up
    down out off is are was were be been being am do does did done has have had having will would shall should
    can could may might must it its this that these those there here which who whom whose what when where why how
    i me my you your he him his she her we us our they them their also just very too some any all each other such
    only own same both few more most s t im thats
    """.split()
)


def _is_dropped(char: str) -> bool:
    return char in _DROPPED_CHARACTERS or unicodedata.category(char).startswith(_DROPPED_CATEGORIES)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization (lower-case, no punctuation, no articles, single spaces), made unicode-aware.

    SQuAD's rules only know ASCII: a model that writes “Paris” with curly quotes, a non-breaking space or a
    full-width letter would miss an exact match a reader would grant. So the text is NFKC-normalized first
    (full-width and compatibility forms become plain ones, a decomposed é becomes é), case-folded, and every
    unicode punctuation character is removed as well as `string.punctuation`. Accented letters stay: "café" is
    not "cafe", as SQuAD keeps them too. Punctuation is removed, not replaced by a space, as in SQuAD, so
    "don't" and "don’t" both become "dont".
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    text = "".join(char for char in text if not _is_dropped(char))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalized_words(text: str) -> list[str]:
    """The normalized answer as its words: what EM compares, F1 counts and recall looks up."""
    return normalize_answer(text).split()


def word_count(text: str) -> int:
    return len(text.split())


_CLAUSE_END = re.compile(r"[?!;\n]|\.(?!\d)|(:)")
_OPTION_SEPARATOR = re.compile(r",|\b(?:or|either)\b", re.IGNORECASE)
_OFFERS_CHOICE = re.compile(r"\b(?:or|either)\b", re.IGNORECASE)


def stated_options(text: str) -> list[tuple[tuple[str, ...], ...]]:
    """The choices a prompt offers, one tuple per clause: "Is it solid, liquid or gas?" gives the normalized word
    runs ("is it solid",), ("liquid",), ("gas",).

    A clause offers a choice when it says "or"/"either", or when a colon introduces a comma list of three or more
    ("one of these families: halogen, noble gas, ..."). The first and last runs may carry the clause's own words
    ("is it", "at room temperature"); is_stated_option allows for that.
    """
    clauses, start, after_colon = [], 0, False
    for found in _CLAUSE_END.finditer(text + "\n"):
        clauses.append((text[start:found.start()], after_colon))
        start, after_colon = found.end(), found.group(1) is not None
    options = []
    for clause, introduced in clauses:
        runs = tuple(run for run in (tuple(normalized_words(part)) for part in _OPTION_SEPARATOR.split(clause)) if run)
        if len(runs) >= 2 and (_OFFERS_CHOICE.search(clause) or (introduced and len(runs) >= 3)):
            options.append(runs)
    return options


def is_stated_option(answer: str, text: str) -> bool:
    """Whether the answer is exactly one of the options `text` offers: the end of a run before the last (a whole
    middle option, "solid" of "is it solid"), or the start of the last run ("gas" of "gas at room temperature").
    Extra words, or two options, fail."""
    words = tuple(normalized_words(answer))
    if not words:
        return False
    for runs in stated_options(text):
        if runs[-1][:len(words)] == words or any(run[-len(words):] == words for run in runs[:-1]):
            return True
    return False
