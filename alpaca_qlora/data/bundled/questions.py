"""Questions: one fact, several phrasings, a short answer and a sentence that states it (for passages).

Each kind of subject has a table of asks; an ask is written once as templates over the subject's named facts and is
asked only where every fact it names is known (a country without a listed capital gets no capital question).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from string import Formatter

from alpaca_qlora.data.bundled.facts import (
    Country,
    Currency,
    Element,
    Facts,
    Language,
    Script,
    Subdivision,
    format_weight,
)
from alpaca_qlora.data.bundled.rows import is_short


@dataclass(frozen=True)
class Question:
    family: str
    phrasings: tuple[str, ...]
    answer: str
    statement: str
    label: str  # the fact's name in a "label: value" note


@dataclass(frozen=True)
class Subject:
    """Something a passage can be written about: a name and the questions its passage answers."""
    name: str
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class Ask:
    """A question family as templates over a subject's facts; `answer` names the fact that answers it."""
    family: str
    phrasings: tuple[str, ...]
    answer: str
    statement: str
    label: str

    def fields(self) -> set[str]:
        templates = (*self.phrasings, self.statement, "{" + self.answer + "}")
        return {name for template in templates for _, name, _, _ in Formatter().parse(template) if name}


Fields = Mapping[str, str | None]


def ask(asks: Sequence[Ask], fields: Fields) -> list[Question]:
    """The table's questions, in table order, for the asks whose facts are all known."""
    return [
        Question(entry.family, tuple(phrasing.format_map(fields) for phrasing in entry.phrasings),
                 fields[entry.answer], entry.statement.format_map(fields), entry.label)
        for entry in asks if all(fields[name] is not None for name in entry.fields())
    ]


COUNTRY_ASKS = (
    Ask("country_alpha_2",
        ("What is the ISO 3166-1 alpha-2 code of {name}?", "Give the two-letter ISO country code for {name}.",
         "Which two-letter code does ISO 3166-1 assign to {name}?", "What is {name}'s alpha-2 country code?"),
        "alpha_2", "The ISO 3166-1 alpha-2 code of {name} is {alpha_2}.", "ISO 3166-1 alpha-2 code"),
    Ask("country_alpha_3",
        ("What is the ISO 3166-1 alpha-3 code of {name}?", "Give the three-letter ISO country code for {name}.",
         "Which alpha-3 code identifies {name} in ISO 3166-1?", "What is {name}'s three-letter country code?"),
        "alpha_3", "{name} has the ISO 3166-1 alpha-3 code {alpha_3}.", "ISO 3166-1 alpha-3 code"),
    Ask("country_numeric",
        ("What is the ISO 3166-1 numeric code of {name}?", "Which three-digit ISO 3166-1 code belongs to {name}?",
         "Give the numeric country code of {name} in ISO 3166-1."),
        "numeric", "In ISO 3166-1, the numeric code of {name} is {numeric}.", "ISO 3166-1 numeric code"),
    Ask("country_capital",
        ("What is the capital of {name}?", "Name the capital city of {name}.", "Which city is the capital of {name}?"),
        "capital", "The capital of {name} is {capital}.", "Capital"),
    Ask("country_currency",
        ("What is the currency of {name}?", "Which currency is used in {name}?",
         "Name the official currency of {name}.", "What currency does {name} use?"),
        "currency", "The currency of {name} is the {currency} ({currency_code}).", "Currency"),
)
# Questions whose answer is the country: only asked where the name is short enough for exact match.
COUNTRY_REVERSE_ASKS = (
    Ask("country_from_alpha_2",
        ("Which country or territory has the ISO 3166-1 alpha-2 code {alpha_2}?",
         "The two-letter ISO country code {alpha_2} stands for which country or territory?",
         "Name the country or territory whose alpha-2 code is {alpha_2}."),
        "name", "The ISO 3166-1 alpha-2 code of {name} is {alpha_2}.", "Name"),
    Ask("country_from_alpha_3",
        ("Which country or territory has the ISO 3166-1 alpha-3 code {alpha_3}?",
         "What does the three-letter ISO country code {alpha_3} stand for?"),
        "name", "{name} has the ISO 3166-1 alpha-3 code {alpha_3}.", "Name"),
    Ask("country_from_capital",
        ("{capital} is the capital of which country?", "Of which country is {capital} the capital?",
         "Which country has {capital} as its capital?"),
        "name", "The capital of {name} is {capital}.", "Name"),
)
ELEMENT_ASKS = (
    Ask("element_symbol",
        ("What is the chemical symbol for {name}?", "Give the element symbol of {name}.",
         "Which symbol represents {name} on the periodic table?", "What is {name}'s chemical symbol?"),
        "symbol", "The chemical symbol of {name} is {symbol}.", "Symbol"),
    Ask("element_number",
        ("What is the atomic number of {name}?", "How many protons does an atom of {name} have?",
         "Give the atomic number of {name}.", "What is {name}'s atomic number?"),
        "number", "{title} has atomic number {number}.", "Atomic number"),
    Ask("element_period",
        ("In which period of the periodic table is {name}?",
         "Which period (row) of the periodic table contains {name}?",
         "What period is {name} in? Answer with a number."),
        "period", "{title} is in period {period} of the periodic table.", "Period"),
    Ask("element_group",
        ("Which group of the periodic table is {name} in?", "What is the group number of {name}?",
         "In which IUPAC group (1-18) is {name}?"),
        "group", "{title} belongs to group {group}.", "Group"),
    Ask("element_weight", ("What is the standard atomic weight of {name}?",),
        "weight", "The standard atomic weight of {name} is about {weight}.", "Standard atomic weight"),
    Ask("element_state", ("Is {name} a solid, a liquid or a gas at room temperature?",),
        "state", "At room temperature {name} is a {state}.", "State at room temperature"),
)
# Asked as factual questions only: their answers are not facts a passage about the element lists.
ELEMENT_LOOKUP_ASKS = (
    Ask("element_from_symbol",
        ("Which element has the chemical symbol {symbol}?", "What element does the symbol {symbol} stand for?",
         "Name the element whose symbol is {symbol}."),
        "title", "The chemical symbol of {name} is {symbol}.", "Name"),
    Ask("element_from_number",
        ("Which element has atomic number {number}?", "Name the element with atomic number {number}.",
         "What is element number {number} of the periodic table?"),
        "title", "{title} has atomic number {number}.", "Name"),
    Ask("element_weight_rounded",
        ("What is the atomic weight of {name}, rounded to the nearest whole number?",
         "Rounded to a whole number, what is the standard atomic weight of {name}?"),
        "rounded_weight", "The standard atomic weight of {name} is about {rounded_weight}.", "Atomic weight"),
)
# "name" is None where two currencies share the name: then only the numeric code is asked.
CURRENCY_ASKS = (
    Ask("currency_numeric",
        ("What is the ISO 4217 numeric code of the currency {code}?",
         "Which three-digit ISO 4217 code belongs to {code}?"),
        "numeric", "The ISO 4217 numeric code of {code} is {numeric}.", "ISO 4217 numeric code"),
    Ask("currency_code",
        ("What is the ISO 4217 code of the {name}?", "Give the three-letter currency code of the {name}.",
         "Which ISO 4217 code is used for the {name}?"),
        "code", "The ISO 4217 code of the {name} is {code}.", "ISO 4217 code"),
    Ask("currency_from_code",
        ("Which currency has the ISO 4217 code {code}?", "What currency does the code {code} stand for?",
         "Name the currency with ISO 4217 code {code}."),
        "name", "The ISO 4217 code of the {name} is {code}.", "Name"),
)
LANGUAGE_ASKS = (
    Ask("language_alpha_2",
        ("What is the ISO 639-1 code for {name}?", "Give the two-letter ISO 639-1 language code of {name}.",
         "Which two-letter code does ISO 639-1 assign to the {name} language?"),
        "alpha_2", "The ISO 639-1 code of {name} is {alpha_2}.", "ISO 639-1 code"),
    Ask("language_alpha_3",
        ("What is the ISO 639-3 code for {name}?", "Give the three-letter ISO 639-3 code of the {name} language."),
        "alpha_3", "{name} has the ISO 639-3 code {alpha_3}.", "ISO 639-3 code"),
    Ask("language_bibliographic",
        ("What is the ISO 639-2 bibliographic code for {name}?",
         "Which ISO 639-2/B (bibliographic) code is used for {name}?"),
        "bibliographic", "The ISO 639-2 bibliographic code of {name} is {bibliographic}.", "ISO 639-2/B code"),
)
LANGUAGE_REVERSE_ASKS = (
    Ask("language_from_alpha_2",
        ("Which language has the ISO 639-1 code '{alpha_2}'?",
         "What language does the ISO 639-1 code '{alpha_2}' stand for?"),
        "name", "The ISO 639-1 code of {name} is {alpha_2}.", "Name"),
)
SCRIPT_ASKS = (
    Ask("script_code",
        ("What is the ISO 15924 code of the {name} script?",
         "Give the four-letter ISO 15924 code for the {name} script."),
        "code", "The ISO 15924 code of the {name} script is {code}.", "ISO 15924 code"),
    Ask("script_from_code",
        ("Which writing system has the ISO 15924 code {code}?",
         "What script does the ISO 15924 code {code} stand for?"),
        "name", "The ISO 15924 code of the {name} script is {code}.", "Name"),
)
REGION_ASKS = (
    Ask("region_code",
        ("What is the ISO 3166-2 code of {phrase} {name}?",
         "Give the ISO 3166-2 subdivision code for {name} ({kind})."),
        "code", "The ISO 3166-2 code of {name} is {code}.", "ISO 3166-2 code"),
    Ask("region_from_code",
        ("Which subdivision has the ISO 3166-2 code {code}?", "What place does the ISO 3166-2 code {code} stand for?"),
        "name", "The ISO 3166-2 code of {name} is {code}.", "Name"),
)


def optional(value: object) -> str | None:
    return None if value is None else str(value)


def country_fields(country: Country) -> Fields:
    currency = country.currency
    return {"name": country.name, "alpha_2": country.alpha_2, "alpha_3": country.alpha_3, "numeric": country.numeric,
            "capital": country.capital, "currency": currency and currency.name,
            "currency_code": currency and currency.code}


def rounded_weight(weight: float | None) -> str | None:
    """Standard atomic weight to the nearest whole number; None where the value sits near a rounding boundary."""
    if weight is None or abs(weight - math.floor(weight) - 0.5) < 0.1:
        return None
    return str(round(weight))


def element_fields(element: Element) -> Fields:
    weight = element.atomic_weight
    return {"name": element.name, "title": element.title, "symbol": element.symbol, "number": str(element.number),
            "period": str(element.period), "group": optional(element.group), "state": element.state,
            "weight": None if weight is None else format_weight(weight), "rounded_weight": rounded_weight(weight)}


def currency_fields(currency: Currency, ambiguous_names: frozenset[str]) -> Fields:
    return {"code": currency.code, "numeric": currency.numeric,
            "name": None if currency.name in ambiguous_names else currency.name}


def language_fields(language: Language) -> Fields:
    return {"name": language.name, "alpha_2": language.alpha_2, "alpha_3": language.alpha_3,
            "bibliographic": language.bibliographic or None}


def country_questions(country: Country) -> list[Question]:
    return [question for question in ask(COUNTRY_ASKS, country_fields(country)) if is_short(question.answer)]


def country_reverse_questions(country: Country) -> list[Question]:
    return ask(COUNTRY_REVERSE_ASKS, country_fields(country)) if is_short(country.name) else []


def element_questions(element: Element) -> list[Question]:
    return ask(ELEMENT_ASKS, element_fields(element))


def element_lookup_questions(element: Element) -> list[Question]:
    return ask(ELEMENT_LOOKUP_ASKS, element_fields(element))


def currency_questions(currency: Currency, ambiguous_names: frozenset[str]) -> list[Question]:
    """A currency's name answers a question only where it is short enough for exact match."""
    return [question for question in ask(CURRENCY_ASKS, currency_fields(currency, ambiguous_names))
            if question.family != "currency_from_code" or is_short(question.answer)]


def language_questions(language: Language) -> list[Question]:
    return ask(LANGUAGE_ASKS, language_fields(language))


def language_reverse_questions(language: Language) -> list[Question]:
    return ask(LANGUAGE_REVERSE_ASKS, language_fields(language))


def script_questions(script: Script) -> list[Question]:
    return ask(SCRIPT_ASKS, {"name": script.name, "code": script.code})


def region_questions(phrase: str, region: Subdivision) -> list[Question]:
    kind = phrase.removeprefix("the ").removesuffix(" of")
    return ask(REGION_ASKS, {"phrase": phrase, "kind": kind, "name": region.name, "code": region.code})


def ambiguous_currency_names(currencies: Sequence[Currency]) -> frozenset[str]:
    names = [currency.name for currency in currencies]
    return frozenset(name for name in names if names.count(name) > 1)


def country_subjects(facts: Facts) -> list[Subject]:
    return [Subject(country.name, tuple(country_questions(country))) for country in facts.countries]


def element_subjects(facts: Facts) -> list[Subject]:
    return [Subject(element.title, tuple(element_questions(element))) for element in facts.elements]


def currency_subjects(facts: Facts) -> list[Subject]:
    ambiguous = ambiguous_currency_names(facts.currencies)
    return [Subject(f"{currency.name} ({currency.code})", tuple(currency_questions(currency, ambiguous)))
            for currency in facts.currencies if currency.name not in ambiguous]


def language_subjects(facts: Facts) -> list[Subject]:
    return [Subject(language.name, tuple(language_questions(language))) for language in facts.languages]
