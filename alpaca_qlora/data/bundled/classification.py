"""classification rows: a label from a set the prompt states."""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice

from alpaca_qlora.data.bundled.facts import Element, Facts, is_prime
from alpaca_qlora.data.bundled.rows import Row, distinct_pairs, make_row, take
from alpaca_qlora.data.bundled.tables import CLASSIFIED_MAX_NUMBER, FAMILIES
from alpaca_qlora.evaluation.answer_text import word_count


def labelled(rng: random.Random, item: str, label: str, asked: Sequence[str], with_input: Sequence[str],
             mention: str | None = None) -> Row:
    """A classification row; over half put the item in the input, as Alpaca's classification rows often do.
    `mention` is how the item reads mid-sentence ("sodium"), where the input shows it as a name ("Sodium")."""
    if rng.random() < 0.6:
        return make_row(rng.choice(with_input), item, label, "classification")
    return make_row(rng.choice(asked).format(item=mention or item), "", label, "classification")


def balanced(rng: random.Random, items: Sequence, label_of: Callable, per_label: int) -> list:
    """At most `per_label` items of each label (in item order), so one label can't dominate a task."""
    by_label: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_label.setdefault(label_of(item), []).append(index)
    kept = {index for label in sorted(by_label) for index in take(rng, by_label[label], per_label)}
    return [item for index, item in enumerate(items) if index in kept]


@dataclass(frozen=True)
class ElementLabel:
    """An element attribute asked as a label, at most `per_label` elements per label. `name_only` is the share of
    items shown by name alone, the rest with the symbol too ("Sodium (Na)"); None shows names only, without a draw."""
    attribute: str
    per_label: int
    asked: tuple[str, ...]
    with_input: tuple[str, ...]
    name_only: float | None = None


ELEMENT_LABELS = (
    ElementLabel(
        "state", 45,
        ("Is {item} a solid, a liquid or a gas at room temperature?",
         "At room temperature, is {item} solid, liquid or gas? Answer with one word.",
         "Classify {item} by its state at room temperature: solid, liquid or gas."),
        ("Classify the following element by its state at room temperature: solid, liquid or gas.",
         "Is this element a solid, liquid or gas at room temperature? Answer with one word.",
         "Label the element below as solid, liquid or gas (its state at 25 °C)."),
        name_only=0.8),
    ElementLabel(
        "metal_class", 40,
        ("Is {item} a metal, a nonmetal or a metalloid?",
         "Classify {item} as a metal, nonmetal or metalloid.",
         "Which class does {item} belong to: metal, nonmetal or metalloid?"),
        ("Classify the element as a metal, nonmetal or metalloid.",
         "Label this chemical element: metal, nonmetal or metalloid?",
         "Decide whether the following element is a metal, a nonmetal or a metalloid.")),
)


def element_label_rows(facts: Facts, rng: random.Random, spec: ElementLabel) -> list[Row]:
    def label_of(element: Element) -> str | None:
        return getattr(element, spec.attribute)

    rows = []
    for element in balanced(rng, [element for element in facts.elements if label_of(element) is not None],
                            label_of, spec.per_label):
        shown = element.title
        if spec.name_only is not None and rng.random() >= spec.name_only:
            shown = f"{element.title} ({element.symbol})"
        rows.append(labelled(rng, shown, label_of(element), spec.asked, spec.with_input, mention=element.name))
    return rows


def family_rows(facts: Facts, rng: random.Random) -> list[Row]:
    rows = []
    main_families = ", ".join(FAMILIES)
    for element in facts.elements:
        if element.family in FAMILIES:
            rows.append(labelled(
                rng, element.title, element.family,
                (f"Which family does {{item}} belong to: {main_families}?",
                 f"Classify {{item}} into one of these groups: {main_families}."),
                (f"Classify the element into one of these families: {main_families}.",
                 f"Which of these families does the following element belong to: {main_families}?"),
                mention=element.name,
            ))
        elif element.family in ("lanthanide", "actinide"):
            rows.append(labelled(
                rng, element.title, element.family,
                ("Is {item} a lanthanide or an actinide?", "Classify {item} as a lanthanide or an actinide."),
                ("Is the following element a lanthanide or an actinide?",
                 "Label the element as lanthanide or actinide."),
                mention=element.name,
            ))
    return rows


def number_rows(rng: random.Random) -> list[Row]:
    rows = []
    for number in balanced(rng, range(2, 500), lambda number: "prime" if is_prime(number) else "composite", 45):
        rows.append(labelled(
            rng, str(number), "prime" if is_prime(number) else "composite",
            ("Is {item} a prime or a composite number?", "Classify the number {item} as prime or composite.",
             "Is {item} prime or composite? Answer with one word."),
            ("Classify the number as prime or composite.", "Is the following number prime or composite?",
             "Label this number: prime or composite."),
        ))
    for number in take(rng, range(500, 100_000), 60):
        rows.append(labelled(
            rng, str(number), "even" if number % 2 == 0 else "odd",
            ("Is {item} even or odd?", "Classify {item} as an even or an odd number."),
            ("Is the following number even or odd?", "Label the number as even or odd."),
        ))
    asked: set[tuple[int, int]] = set()
    while len(asked) < 40:
        divisor = rng.choice((3, 4, 5, 6, 9, 11))
        number = rng.randrange(100, 10_000)
        if len(asked) % 2 == 0:  # half are multiples, or "no" would be the answer five times in six
            number -= number % divisor
        if (number, divisor) in asked:
            continue
        asked.add((number, divisor))
        rows.append(labelled(
            rng, str(number), "yes" if number % divisor == 0 else "no",
            (f"Is {{item}} divisible by {divisor}? Answer yes or no.",
             f"Can {{item}} be divided by {divisor} without a remainder? Reply yes or no."),
            (f"Is the following number divisible by {divisor}? Answer yes or no.",
             f"Answer yes or no: is this number a multiple of {divisor}?"),
        ))
    return rows


def category_rows(facts: Facts, rng: random.Random, count: int) -> list[Row]:
    """Name -> kind of thing. Names that belong to more than one kind (Nauru, Guarani) are left out."""
    names_by_kind = {
        "country": [country.name for country in facts.countries],
        "chemical element": [element.title for element in facts.elements],
        "currency": [currency.name for currency in facts.currencies],
        "language": [language.name for language in facts.languages],
    }
    kinds_of: dict[str, set[str]] = {}
    for kind, names in names_by_kind.items():
        for name in names:
            kinds_of.setdefault(name.casefold(), set()).add(kind)
    # One-word ISO currency names ("Som", "Tala") are left out: out of context they read as ordinary words.
    pool = sorted({(name, kind) for kind, names in names_by_kind.items() for name in names
                   if len(kinds_of[name.casefold()]) == 1 and (kind != "currency" or word_count(name) >= 2)})
    labels = "country, chemical element, currency or language"
    return [labelled(
        rng, name, kind,
        (f"Is \"{{item}}\" a {labels}?", f"Classify \"{{item}}\" as a {labels}."),
        (f"Classify the following name as a {labels}.", f"What kind of thing is this: {labels}?",
         f"Which category fits the item below: {labels}?"),
    ) for name, kind in take(rng, pool, count)]


def atomic_number_comparison_rows(facts: Facts, rng: random.Random, count: int) -> list[Row]:
    rows = []
    pairs = distinct_pairs(rng, facts.elements[:CLASSIFIED_MAX_NUMBER], key=lambda element: element.number)
    for first, second in islice(pairs, count):
        larger = max(first, second, key=lambda element: element.number)
        question = rng.choice(("Which has the higher atomic number, {a} or {b}?",
                               "Which element has more protons: {a} or {b}?",
                               "Of {a} and {b}, which comes later in the periodic table?"))
        rows.append(make_row(question.format(a=first.name, b=second.name), "", larger.title, "classification"))
    return rows


def classification_rows(facts: Facts, rng: random.Random) -> list[Row]:
    rows = [row for spec in ELEMENT_LABELS for row in element_label_rows(facts, rng, spec)]
    rows += family_rows(facts, rng) + number_rows(rng)
    rows += category_rows(facts, rng, 80)
    rows += atomic_number_comparison_rows(facts, rng, 55)
    return rows

