"""factual rows: a question with an empty input and a short answer, drawn per question family by quota."""
from __future__ import annotations

import random

from alpaca_qlora.data.bundled.facts import Facts
from alpaca_qlora.data.bundled.questions import (
    Question,
    ambiguous_currency_names,
    country_questions,
    country_reverse_questions,
    currency_questions,
    element_lookup_questions,
    element_questions,
    language_questions,
    language_reverse_questions,
    region_questions,
    script_questions,
)
from alpaca_qlora.data.bundled.rows import Row, is_short, make_row, take

FACTUAL_QUOTAS: dict[str, int] = {
    "country_alpha_2": 85, "country_alpha_3": 65, "country_numeric": 45, "country_capital": 65,
    "country_currency": 60, "country_from_alpha_2": 45, "country_from_alpha_3": 25, "country_from_capital": 25,
    "currency_code": 45, "currency_numeric": 20, "currency_from_code": 40,
    "element_symbol": 70, "element_number": 50, "element_period": 30, "element_group": 30,
    "element_from_symbol": 50, "element_from_number": 40, "element_weight_rounded": 25,
    "language_alpha_2": 45, "language_alpha_3": 25, "language_bibliographic": 10, "language_from_alpha_2": 30,
    "script_code": 20, "script_from_code": 15, "region_code": 40, "region_from_code": 20,
}


def factual_pool(facts: Facts) -> dict[str, list[Question]]:
    """Every empty-input question the facts support, grouped by family."""
    ambiguous = ambiguous_currency_names(facts.currencies)
    questions: list[Question] = []
    for country in facts.countries:
        questions += country_questions(country) + country_reverse_questions(country)
    for currency in facts.currencies:
        questions += currency_questions(currency, ambiguous)
    for element in facts.elements:
        questions += element_questions(element) + element_lookup_questions(element)
    for language in facts.languages:
        questions += language_questions(language) + language_reverse_questions(language)
    for script in facts.scripts:
        questions += script_questions(script)
    for phrase, region in facts.regions:
        questions += region_questions(phrase, region)
    pool: dict[str, list[Question]] = {}
    for question in questions:
        if is_short(question.answer):
            pool.setdefault(question.family, []).append(question)
    return pool


def factual_rows(facts: Facts, rng: random.Random) -> list[Row]:
    pool = factual_pool(facts)
    rows = []
    for family, quota in FACTUAL_QUOTAS.items():
        for question in take(rng, pool.get(family, []), quota):
            rows.append(make_row(rng.choice(question.phrasings), "", question.answer, "factual"))
    return rows

