"""closed_qa rows: the answer is in the input (a passage, notes, or a code table)."""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from alpaca_qlora.data.bundled.facts import Facts, Subdivision
from alpaca_qlora.data.bundled.questions import (
    Subject,
    country_subjects,
    currency_subjects,
    element_subjects,
    language_subjects,
)
from alpaca_qlora.data.bundled.rows import Row, is_short, make_row, take

CLOSED_QA_LEADS = (
    "Answer the question using the passage below. {question}",
    "Read the text and answer: {question}",
    "Based on the following passage, answer this question: {question}",
    "{question} Use only the information in the text.",
    "{question} Answer from the passage.",
)
CLOSED_QA_GENERIC = (
    "Answer the question based on the context.",
    "Read the passage and answer the question that follows.",
    "Use the information in the text to answer the question.",
    "Answer the question briefly, using only the given text.",
)


def prose_passage(subject: Subject, rng: random.Random) -> str:
    statements = list(dict.fromkeys(question.statement for question in subject.questions))
    rng.shuffle(statements)
    return " ".join(statements)


def notes_passage(subject: Subject, rng: random.Random) -> str:  # rng unused: the same signature as prose_passage
    lines = [subject.name] + [f"{question.label}: {question.answer}" for question in subject.questions]
    return "\n".join(lines)


def closed_qa_row(question_text: str, passage: str, answer: str, rng: random.Random) -> Row:
    """One of three layouts: the question in the instruction, a lead + question, or the question inside the input."""
    layout = rng.randrange(3)
    if layout == 0:
        return make_row(question_text, passage, answer, "closed_qa")
    if layout == 1:
        return make_row(rng.choice(CLOSED_QA_LEADS).format(question=question_text), passage, answer, "closed_qa")
    context = rng.choice(("{passage}\n\nQuestion: {question}", "Context: {passage}\nQuestion: {question}",
                          "Text: {passage}\n\nQ: {question}"))
    return make_row(rng.choice(CLOSED_QA_GENERIC), context.format(passage=passage, question=question_text),
                    answer, "closed_qa")


def single_subject_rows(subjects: Sequence[Subject], count: int, passage: Callable, rng: random.Random) -> list[Row]:
    rows = []
    usable = [subject for subject in subjects if len(subject.questions) >= 2]
    for subject in take(rng, usable, count):
        question = rng.choice(subject.questions)
        rows.append(closed_qa_row(rng.choice(question.phrasings), passage(subject, rng), question.answer, rng))
    return rows


def pair_passage_rows(subjects: Sequence[Subject], count: int, rng: random.Random) -> list[Row]:
    """Passages about two subjects, so the answer has to be picked from the right one."""
    rows, used = [], set()
    usable = [subject for subject in subjects if len(subject.questions) >= 2]
    while len(rows) < count and len(used) < len(usable) * (len(usable) - 1) // 2:
        first, second = sorted(rng.sample(range(len(usable)), 2))
        if (first, second) in used:
            continue
        used.add((first, second))
        pair = [usable[first], usable[second]]
        rng.shuffle(pair)
        asked = rng.choice(pair[0].questions)
        passage = "\n\n".join(prose_passage(subject, rng) for subject in pair)
        rows.append(closed_qa_row(rng.choice(asked.phrasings), passage, asked.answer, rng))
    return rows


REGION_TABLE_LAYOUTS = (("ISO 3166-2 codes:", "{code}: {name}"), ("Subdivision codes (ISO 3166-2):", "{code}: {name}"),
                        ("Code | Name", "{code} | {name}"))


def region_table_rows(facts: Facts, count: int, rng: random.Random) -> list[Row]:
    """A short code table of one country's subdivisions, then a question about one line of it."""
    by_phrase: dict[str, list[Subdivision]] = {}
    for phrase, region in facts.regions:
        by_phrase.setdefault(phrase, []).append(region)
    groups = [regions for _, regions in sorted(by_phrase.items()) if len(regions) >= 5]
    rows, asked = [], set()
    for _ in range(count * 20):
        if len(rows) == count:
            break
        regions = rng.choice(groups)
        shown = take(rng, regions, rng.randint(4, min(8, len(regions))))
        target = rng.choice(shown)
        if target.code in asked:
            continue
        asked.add(target.code)
        header, line = rng.choice(REGION_TABLE_LAYOUTS)
        table = "\n".join([header] + [line.format(code=region.code, name=region.name) for region in shown])
        if rng.random() < 0.5:
            question = rng.choice((f"What is the code for {target.name}?", f"Which code is listed for {target.name}?"))
            answer = target.code
        else:
            question = rng.choice((f"Which subdivision has the code {target.code}?",
                                   f"What name goes with {target.code}?"))
            answer = target.name
        if is_short(answer):
            rows.append(closed_qa_row(question, table, answer, rng))
    return rows


def closed_qa_rows(facts: Facts, rng: random.Random) -> list[Row]:
    countries, elements = country_subjects(facts), element_subjects(facts)
    currencies, languages = currency_subjects(facts), language_subjects(facts)
    rows = []
    rows += single_subject_rows(countries, 130, prose_passage, rng)
    rows += single_subject_rows(elements, 100, prose_passage, rng)
    rows += single_subject_rows(currencies, 35, prose_passage, rng)
    rows += single_subject_rows(languages, 30, prose_passage, rng)
    rows += single_subject_rows(countries, 45, notes_passage, rng)
    rows += single_subject_rows(elements, 45, notes_passage, rng)
    rows += pair_passage_rows(countries, 35, rng)
    rows += pair_passage_rows(elements, 35, rng)
    rows += region_table_rows(facts, 45, rng)
    return rows

