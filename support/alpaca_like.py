"""A real-format stand-in for alpaca-cleaned, for tests: no task types, long prose references, few short answers.

No Alpaca-format data set ships on PyPI (alpaca-eval and alpaca-farm carry leaderboards and code only), and the
tests may not reach the hub, so this builds one with alpaca-cleaned's shape: `instruction`, `input`, `output`;
references whose length in words is log-normal (median about 100 words, a tail to several hundred, as in
alpaca-cleaned where references average about 170 tokens); about 5% of references have at most five words; a few
of those answer a choice the instruction offers ("positive or negative"), as Alpaca's classification rows do.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from alpaca_qlora.evaluation.metrics import is_short_answer

TOPICS = ("renewable energy", "the water cycle", "remote work", "machine learning", "urban gardening", "sleep",
          "the Roman Empire", "climate change", "public libraries", "electric cars", "volcanoes", "photosynthesis",
          "time management", "the printing press", "coral reefs", "personal budgeting", "honey bees", "jazz")
OPEN_INSTRUCTIONS = ("Write a short essay about {topic}.", "Explain {topic} to a high school student.",
                     "Give three tips related to {topic}.", "Describe the main benefits of {topic}.",
                     "Summarize the following text.", "Rewrite the paragraph below in a more formal tone.",
                     "Generate a blog post introduction about {topic}.", "What are the pros and cons of {topic}?")
WORDS = ("people", "often", "important", "because", "energy", "system", "process", "many", "different", "example",
         "help", "reduce", "improve", "their", "daily", "life", "research", "shows", "that", "can", "also",
         "environment", "community", "benefits", "challenges", "future", "history", "modern", "simple", "steps",
         "understand", "water", "light", "growth", "cost", "health", "time", "world", "new", "way", "plan",
         "important,", "however,", "for", "example,", "the", "a", "of", "and", "to", "in", "is", "are", "with")
CHOICES = (("Classify the sentiment of this review as positive or negative.", ("positive", "negative")),
           ("Is the following statement true or false?", ("True", "False")),
           ("Identify whether the following is a fruit or a vegetable.", ("Fruit", "Vegetable")))
SHORT_FACTS = (("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "Eight"),
               ("Who wrote Hamlet?", "William Shakespeare"), ("What is the chemical symbol for gold?", "Au"))


def _prose(rng: random.Random, words: int) -> str:
    sentences, left = [], words
    while left > 0:
        length = min(left, rng.randint(8, 22))
        sentence = " ".join(rng.choice(WORDS) for _ in range(length))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        left -= length
    return " ".join(sentences)


def alpaca_like_rows(count: int = 1000, *, seed: int = 0, short_share: float = 0.05) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        if rng.random() < short_share:
            if rng.random() < 0.5:
                instruction, options = rng.choice(CHOICES)
                rows.append({"instruction": instruction, "input": _prose(rng, rng.randint(8, 30)),
                             "output": rng.choice(options)})
            else:
                question, answer = rng.choice(SHORT_FACTS)
                rows.append({"instruction": f"{question} ({index})", "input": "", "output": answer})
            continue
        topic = rng.choice(TOPICS)
        instruction = rng.choice(OPEN_INSTRUCTIONS).format(topic=topic)
        context = _prose(rng, rng.randint(30, 120)) if "following" in instruction or "below" in instruction else ""
        words = max(6, min(700, int(math.exp(rng.gauss(4.6, 0.6)))))
        rows.append({"instruction": f"{instruction} ({index})" if not context else instruction, "input": context,
                     "output": _prose(rng, words)})
    return rows


def write_alpaca_like(path: Path, count: int = 1000, **kwargs) -> Path:
    """As alpaca_data_cleaned.json: one JSON array of rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(alpaca_like_rows(count, **kwargs), indent=1), encoding="utf-8")
    return path


SHORT_TYPES = ("closed_qa", "factual", "classification")


def with_ids(rows):
    """The rows with ids as the fetch stage gives them, in order."""
    return [{"id": f"{index:05d}", **row} for index, row in enumerate(rows)]


def short_rule(row):
    """The short-answer rule with the evaluation's task types and at most five words."""
    return is_short_answer(row.get("task_type"), row["output"], short_answer_task_types=SHORT_TYPES, max_words=5)
