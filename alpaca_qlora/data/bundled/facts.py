"""Facts, loaded in sorted order from pycountry, periodictable and the hand-written tables, and number facts.

ISO "official names" are not used (iso-codes lags behind several renamings); names that are inverted or qualified
("Congo, The ...") are skipped.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import periodictable
import pycountry

from alpaca_qlora.data.bundled.tables import (
    ACTINIDES,
    CAPITALS,
    CLASS_UNSETTLED,
    CLASSIFIED_MAX_NUMBER,
    COUNTRY_CURRENCIES,
    FAMILIES,
    GASES,
    LANTHANIDES,
    LIQUIDS,
    METALLOIDS,
    NON_CURRENCY_CODES,
    NONMETALS,
    PERIOD_ENDS,
    REGION_KINDS,
    STATE_UNSETTLED,
)


@dataclass(frozen=True)
class Currency:
    code: str
    name: str
    numeric: str


@dataclass(frozen=True)
class Subdivision:
    code: str
    name: str


@dataclass(frozen=True)
class Country:
    alpha_2: str
    alpha_3: str
    numeric: str
    name: str
    capital: str | None
    currency: Currency | None
    subdivisions: tuple[Subdivision, ...]


@dataclass(frozen=True)
class Element:
    number: int
    symbol: str
    name: str  # lower case, as used mid-sentence
    period: int
    group: int | None
    state: str | None
    metal_class: str | None
    family: str | None
    atomic_weight: float | None  # standard atomic weight; None where IUPAC gives none

    @property
    def title(self) -> str:
        return self.name.capitalize()


@dataclass(frozen=True)
class Language:
    name: str
    alpha_2: str
    alpha_3: str
    bibliographic: str | None


@dataclass(frozen=True)
class Script:
    code: str
    name: str
    numeric: str


@dataclass(frozen=True)
class Facts:
    countries: tuple[Country, ...]
    currencies: tuple[Currency, ...]
    elements: tuple[Element, ...]
    languages: tuple[Language, ...]
    scripts: tuple[Script, ...]
    regions: tuple[tuple[str, Subdivision], ...]  # (what it is, e.g. "the US state of", subdivision)


def load_currencies() -> tuple[Currency, ...]:
    """ISO 4217 currencies in circulation, without funds, metals and other technical codes."""
    return tuple(
        Currency(entry.alpha_3, entry.name, entry.numeric)
        for entry in sorted(pycountry.currencies, key=lambda entry: entry.alpha_3)
        if entry.alpha_3 not in NON_CURRENCY_CODES
    )


def country_display_name(entry) -> str | None:
    """The everyday name ("South Korea"), or None for ISO names that are inverted or qualified ("Congo, The ...")."""
    name = getattr(entry, "common_name", None) or entry.name
    return None if re.search(r"[,()]", name) else name


def load_countries(currencies: Sequence[Currency]) -> tuple[Country, ...]:
    by_code = {currency.code: currency for currency in currencies}
    missing = sorted(code for code in set(COUNTRY_CURRENCIES.values()) if code not in by_code)
    if missing:
        raise ValueError(f"COUNTRY_CURRENCIES names currencies that pycountry does not list: {missing}")
    countries = []
    for entry in sorted(pycountry.countries, key=lambda entry: entry.alpha_2):
        name = country_display_name(entry)
        if name is None:
            continue
        subdivisions = sorted(pycountry.subdivisions.get(country_code=entry.alpha_2) or [], key=lambda s: s.code)
        currency_code = COUNTRY_CURRENCIES.get(entry.alpha_2)
        countries.append(Country(
            alpha_2=entry.alpha_2, alpha_3=entry.alpha_3, numeric=entry.numeric, name=name,
            capital=CAPITALS.get(entry.alpha_2),
            currency=by_code[currency_code] if currency_code else None,
            subdivisions=tuple(Subdivision(sub.code, sub.name) for sub in subdivisions
                               if getattr(sub, "parent_code", None) is None),
        ))
    return tuple(countries)


def period_of(number: int) -> int:
    return next(index + 1 for index, end in enumerate(PERIOD_ENDS) if number <= end)


def group_of(number: int) -> int | None:
    """IUPAC group (1-18) from the position in the period; None for the lanthanides and actinides."""
    if number in LANTHANIDES or number in ACTINIDES:
        return None
    period = period_of(number)
    if period == 1:
        return 1 if number == 1 else 18
    position = number - PERIOD_ENDS[period - 2] - 1
    if period in (2, 3):
        return position + 1 if position < 2 else position + 11
    if period in (4, 5):
        return position + 1
    return position + 1 if position < 2 else position - 13


def state_of(symbol: str, number: int) -> str | None:
    if number > CLASSIFIED_MAX_NUMBER or symbol in STATE_UNSETTLED:
        return None
    return "gas" if symbol in GASES else "liquid" if symbol in LIQUIDS else "solid"


def metal_class_of(symbol: str, number: int) -> str | None:
    if number > CLASSIFIED_MAX_NUMBER or symbol in CLASS_UNSETTLED:
        return None
    return "nonmetal" if symbol in NONMETALS else "metalloid" if symbol in METALLOIDS else "metal"


def family_of(symbol: str, number: int) -> str | None:
    for family, members in FAMILIES.items():
        if symbol in members:
            return family
    if number in LANTHANIDES:
        return "lanthanide"
    if number in ACTINIDES:
        return "actinide"
    return None


def has_standard_atomic_weight(number: int) -> bool:
    """IUPAC gives none for technetium, promethium and elements past bismuth other than thorium, protactinium and
    uranium (periodictable reports a most-stable-isotope mass for those instead)."""
    return number <= 83 and number not in (43, 61) or number in (90, 91, 92)


def load_elements() -> tuple[Element, ...]:
    elements = []
    for number in range(1, 119):
        entry = periodictable.elements[number]
        elements.append(Element(
            number=number, symbol=entry.symbol, name=entry.name, period=period_of(number), group=group_of(number),
            state=state_of(entry.symbol, number), metal_class=metal_class_of(entry.symbol, number),
            family=family_of(entry.symbol, number),
            atomic_weight=float(entry.mass) if has_standard_atomic_weight(number) else None,
        ))
    return tuple(elements)


def load_languages() -> tuple[Language, ...]:
    """Languages with an ISO 639-1 code and a plain name ("(macrolanguage)" is dropped, other qualifiers skipped)."""
    languages = []
    for entry in sorted(pycountry.languages, key=lambda entry: entry.alpha_3):
        if not hasattr(entry, "alpha_2"):
            continue
        name = entry.name.removesuffix(" (macrolanguage)")
        if re.search(r"[,()]", name):
            continue
        languages.append(Language(name, entry.alpha_2, entry.alpha_3, getattr(entry, "bibliographic", None)))
    return tuple(sorted(languages, key=lambda language: language.alpha_2))


def load_scripts() -> tuple[Script, ...]:
    """ISO 15924 scripts with a plain one- or two-word name (no private-use or special Z codes)."""
    return tuple(
        Script(entry.alpha_4, entry.name, entry.numeric)
        for entry in sorted(pycountry.scripts, key=lambda entry: entry.alpha_4)
        if re.fullmatch(r"[A-Z][A-Za-z]+( [A-Z][a-z]+)?", entry.name) and entry.alpha_4[0] not in "QZ"
    )


def load_regions() -> tuple[tuple[str, Subdivision], ...]:
    regions = []
    for (country_code, kind), phrase in sorted(REGION_KINDS.items()):
        for entry in sorted(pycountry.subdivisions.get(country_code=country_code) or [], key=lambda s: s.code):
            if entry.type == kind:
                regions.append((phrase, Subdivision(entry.code, entry.name)))
    return tuple(sorted(regions, key=lambda region: region[1].code))


def load_facts() -> Facts:
    currencies = load_currencies()
    return Facts(
        countries=load_countries(currencies), currencies=currencies, elements=load_elements(),
        languages=load_languages(), scripts=load_scripts(), regions=load_regions(),
    )


def format_weight(weight: float) -> str:
    """Two decimals, rounded half up on the decimal value (173.045 -> 173.05, where float formatting gives 173.04)."""
    return str(Decimal(repr(weight)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


# --- numbers -------------------------------------------------------------------------------------------------------

def is_prime(number: int) -> bool:
    return number >= 2 and all(number % divisor for divisor in range(2, math.isqrt(number) + 1))


def roman(number: int) -> str:
    numerals = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
                (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))
    text = ""
    for value, numeral in numerals:
        while number >= value:
            text, number = text + numeral, number - value
    return text


def prime_factors(number: int) -> list[int]:
    factors, divisor = [], 2
    while divisor * divisor <= number:
        while number % divisor == 0:
            factors.append(divisor)
            number //= divisor
        divisor += 1
    return factors + ([number] if number > 1 else [])


def next_prime(number: int) -> int:
    candidate = number + 1
    while not is_prime(candidate):
        candidate += 1
    return candidate

