"""open_ended rows: a few sentences composed from facts, asked for by name or as "write this up from these notes"."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from itertools import islice

from alpaca_qlora.data.bundled.facts import (
    Country,
    Currency,
    Element,
    Facts,
    Language,
    Subdivision,
    format_weight,
    is_prime,
    next_prime,
    prime_factors,
    roman,
)
from alpaca_qlora.data.bundled.rows import (
    OPEN_ENDED_SENTENCES,
    OPEN_ENDED_WORDS,
    Row,
    distinct_pairs,
    make_row,
    take,
)
from alpaca_qlora.data.bundled.tables import FAMILIES
from alpaca_qlora.evaluation.answer_text import word_count


def joined(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# A description is a list of points: a sentence and the note lines that state the same facts, so the "write this up
# from these notes" rows never ask the model to add a fact that is not in its input.
Point = tuple[str, tuple[str, ...]]


def sentences_of(points: Sequence[Point]) -> list[str]:
    return [sentence for sentence, _ in points]


def notes_of(points: Sequence[Point]) -> str:
    return "\n".join(line for _, lines in points for line in lines)


def country_points(country: Country, shown_subdivisions: Sequence[Subdivision]) -> list[Point]:
    points: list[Point] = [(
        f"{country.name} is identified in ISO 3166-1 by the alpha-2 code {country.alpha_2}, "
        f"the alpha-3 code {country.alpha_3} and the numeric code {country.numeric}.",
        (f"Name: {country.name}", f"Alpha-2: {country.alpha_2}", f"Alpha-3: {country.alpha_3}",
         f"Numeric: {country.numeric}"))]
    currency = country.currency
    if country.capital and currency:
        points.append((f"Its capital is {country.capital}, and its currency is the {currency.name} ({currency.code}).",
                       (f"Capital: {country.capital}", f"Currency: {currency.name} ({currency.code})")))
    elif country.capital:
        points.append((f"Its capital is {country.capital}.", (f"Capital: {country.capital}",)))
    elif currency:
        points.append((f"Its currency is the {currency.name} ({currency.code}).",
                       (f"Currency: {currency.name} ({currency.code})",)))
    if len(shown_subdivisions) == 2:
        first, second = shown_subdivisions
        points.append((f"ISO 3166-2 defines codes for its subdivisions, such as {first.name} ({first.code}) and "
                       f"{second.name} ({second.code}).",
                       (f"Subdivisions (ISO 3166-2): {first.name} ({first.code}), {second.name} ({second.code})",)))
    if word_count(" ".join(sentences_of(points))) < OPEN_ENDED_WORDS[0]:
        points.append((f"The numeric code {country.numeric} identifies it without relying on the Latin alphabet, "
                       "which the two-letter codes need.", ()))
    return points


def element_position(element: Element) -> Point:
    if element.group is not None:
        return (f"It sits in period {element.period} and group {element.group} of the periodic table.",
                (f"Period: {element.period}", f"Group: {element.group}"))
    return (f"It sits in period {element.period} and is one of the {element.family}s.",
            (f"Period: {element.period}", f"Series: {element.family}s"))


def element_points(element: Element) -> list[Point]:
    points: list[Point] = [
        (f"{element.title} is a chemical element with the symbol {element.symbol} and atomic number "
         f"{element.number}.",
         (f"Element: {element.title}", f"Symbol: {element.symbol}", f"Atomic number: {element.number}")),
        element_position(element),
    ]
    if element.family in FAMILIES:
        points.append((f"It is {article(element.family)} {element.family}.", (f"Family: {element.family}",)))
    elif element.metal_class is not None:
        points.append((f"It is classed as {article(element.metal_class)} {element.metal_class}.",
                       (f"Class: {element.metal_class}",)))
    if element.state is not None:
        points.append((f"At room temperature it is {article(element.state)} {element.state}.",
                       (f"State at room temperature: {element.state}",)))
    if element.atomic_weight is not None:
        weight = format_weight(element.atomic_weight)
        points.append((f"Its standard atomic weight is about {weight}.", (f"Standard atomic weight: {weight}",)))
    if (element.number in (43, 61) or element.number >= 84) and len(points) < OPEN_ENDED_SENTENCES[1]:
        points.append(("All of its isotopes are radioactive.", ("Isotopes: all radioactive",)))
    return points


def element_comparison(first: Element, second: Element) -> list[str]:
    heavier, lighter = (first, second) if first.number > second.number else (second, first)
    sentences = [f"{first.title} ({first.symbol}) has atomic number {first.number}, while {second.name} "
                 f"({second.symbol}) has atomic number {second.number}, so {heavier.name} has "
                 f"{heavier.number - lighter.number} more protons in its nucleus."]
    if first.period == second.period:
        sentences.append(f"Both are in period {first.period} of the periodic table.")
    else:
        sentences.append(f"{first.title} is in period {first.period}, and {second.name} is in period "
                         f"{second.period}.")
    if first.metal_class == second.metal_class:
        sentences.append(f"Both are classed as {first.metal_class}s.")
    else:
        sentences.append(f"{first.title} is {article(first.metal_class)} {first.metal_class}, whereas "
                         f"{second.name} is {article(second.metal_class)} {second.metal_class}.")
    if first.state == second.state:
        sentences.append(f"Both are {first.state}s at room temperature.")
    else:
        sentences.append(f"At room temperature {first.name} is {article(first.state)} {first.state} and "
                         f"{second.name} is {article(second.state)} {second.state}.")
    return sentences


def currency_note(currency: Currency, users: Sequence[Country], rng: random.Random) -> list[str]:
    sentences = [f"The {currency.name} has the ISO 4217 alphabetic code {currency.code} and the numeric code "
                 f"{currency.numeric}."]
    if len(users) == 1:
        sentences.append(f"It is the currency of {users[0].name}.")
    elif users:
        shown = take(rng, users, 4)
        sentences.append(f"It is the currency of several countries, including {joined([c.name for c in shown])}.")
    issuer = next((country for country in users if country.alpha_2 == currency.code[:2]), None)
    if issuer is not None:
        sentences.append(f"The first two letters of the code, {issuer.alpha_2}, are the ISO 3166-1 alpha-2 code "
                         f"of {issuer.name}.")
    numeric_twin = next((country for country in users if country.numeric == currency.numeric), None)
    if numeric_twin is not None:
        sentences.append(f"Its numeric code is the same as the ISO 3166-1 numeric code of {numeric_twin.name}.")
    return sentences


def language_note(language: Language) -> list[str]:
    sentences = [f"{language.name} has the two-letter ISO 639-1 code {language.alpha_2} and the three-letter "
                 f"ISO 639-3 code {language.alpha_3}."]
    if language.bibliographic:
        sentences.append(f"ISO 639-2 also lists the bibliographic code {language.bibliographic} for it, "
                         f"alongside the terminology code {language.alpha_3}.")
    sentences.append("ISO 639-1 gives two-letter codes to a limited set of major languages, while ISO 639-3 aims "
                     "to give a three-letter code to every known language.")
    return sentences

def number_description(number: int) -> list[str]:
    divisors = [value for value in range(1, number + 1) if number % value == 0]
    sentences = [f"{number} is an {'even' if number % 2 == 0 else 'odd'} number."]
    if is_prime(number):
        sentences.append(f"It is prime, so its only positive divisors are 1 and {number}.")
        sentences.append(f"The next prime number after it is {next_prime(number)}.")
    else:
        factorization = " × ".join(map(str, prime_factors(number)))
        sentences.append(f"It is composite, and its prime factorization is {factorization}.")
        sentences.append(f"It has {len(divisors)} positive divisors, which add up to {sum(divisors)}.")
    root = math.isqrt(number)
    if root * root == number:
        sentences.append(f"It is a perfect square, since {root} × {root} = {number}.")
    sentences.append(f"In Roman numerals it is written {roman(number)}, and in binary it is {number:b}.")
    return sentences


def fits_open_ended(sentences: Sequence[str]) -> bool:
    low, high = OPEN_ENDED_WORDS
    return (OPEN_ENDED_SENTENCES[0] <= len(sentences) <= OPEN_ENDED_SENTENCES[1]
            and low <= word_count(" ".join(sentences)) <= high)


def open_row(instruction: str, input_text: str, sentences: Sequence[str]) -> Row:
    return make_row(instruction, input_text, " ".join(sentences), "open_ended")


PROFILE_ASKS = ("Write a short profile of {name}.", "Describe {name} in a few sentences.",
                "Tell me about {name} in a short paragraph.", "Summarize the key facts about {name}.")
NOTES_ASKS = ("Turn these notes into a short paragraph.", "Write a brief description from the facts below.",
              "Rewrite the following facts as a few connected sentences.",
              "Use the information below to write a short summary.")


def described_rows(rng: random.Random, described: Sequence[tuple[str, list[Point]]], with_notes: int,
                   asks: Sequence[str]) -> list[Row]:
    """One row per (name, points); `with_notes` of them are asked as "write this up from these notes"."""
    noted = set(take(rng, range(len(described)), with_notes))
    rows = []
    for index, (name, points) in enumerate(described):
        if not fits_open_ended(sentences_of(points)):
            continue
        if index in noted:
            rows.append(open_row(rng.choice(NOTES_ASKS), notes_of(points), sentences_of(points)))
        else:
            rows.append(open_row(rng.choice(asks).format(name=name), "", sentences_of(points)))
    return rows


def country_profile_rows(facts: Facts, rng: random.Random, count: int) -> list[Row]:
    described = []
    for country in take(rng, facts.countries, count):
        shown = take(rng, country.subdivisions, 2) if len(country.subdivisions) >= 2 else []
        described.append((country.name, country_points(country, shown)))
    return described_rows(rng, described, 55, PROFILE_ASKS)


def element_description_rows(facts: Facts, rng: random.Random, count: int) -> list[Row]:
    asks = ("Describe the element {name}.", "Write a short description of {name}.",
            "Give an overview of the chemical element {name}.", "What should I know about {name}?")
    described = [(element.name, element_points(element)) for element in take(rng, facts.elements, count)]
    return described_rows(rng, described, 35, asks)


def element_comparison_rows(facts: Facts, rng: random.Random, count: int) -> list[Row]:
    comparable = [element for element in facts.elements if element.state and element.metal_class]
    asks = ("Compare {a} and {b}.", "How do {a} and {b} differ?",
            "Explain the similarities and differences between {a} and {b}.", "Contrast {a} with {b}.")
    pairs = distinct_pairs(rng, comparable, key=lambda element: element.number)
    return [open_row(rng.choice(asks).format(a=first.name, b=second.name), "", element_comparison(first, second))
            for first, second in islice(pairs, count)]


def currency_note_rows(facts: Facts, rng: random.Random, count: int) -> list[Row]:
    users_by_code: dict[str, list[Country]] = {}
    for country in facts.countries:
        if country.currency:
            users_by_code.setdefault(country.currency.code, []).append(country)
    asks = ("Write a short note on the {name}.", "Describe the {name} ({code}).",
            "Explain what the currency code {code} refers to.")
    rows = []
    for currency in take(rng, facts.currencies, count):
        sentences = currency_note(currency, users_by_code.get(currency.code, []), rng)
        if fits_open_ended(sentences):  # currencies no listed country uses say too little
            rows.append(open_row(rng.choice(asks).format(name=currency.name, code=currency.code), "", sentences))
    return rows


def language_note_rows(facts: Facts, rng: random.Random, count: int) -> list[Row]:
    asks = ("Explain the ISO 639 codes for {name}.",
            "Which ISO 639 language codes does {name} have? Answer in a few sentences.")
    return [open_row(rng.choice(asks).format(name=language.name), "", language_note(language))
            for language in take(rng, facts.languages, count)]


def number_description_rows(rng: random.Random, count: int) -> list[Row]:
    asks = ("Describe the number {n}.", "Tell me some facts about the number {n}.",
            "What are the mathematical properties of {n}?")
    return [open_row(rng.choice(asks).format(n=number), "", number_description(number))
            for number in take(rng, range(10, 1000), count)]


def open_ended_rows(facts: Facts, rng: random.Random) -> list[Row]:
    return (country_profile_rows(facts, rng, 150) + element_description_rows(facts, rng, 110)
            + element_comparison_rows(facts, rng, 60) + currency_note_rows(facts, rng, 120)
            + language_note_rows(facts, rng, 30) + number_description_rows(rng, 70))

