"""The project's own Alpaca-format data set, generated offline and deterministically from facts.

alpaca-cleaned can't be downloaded in the offline profile, so the default data source is built here: from the
ISO tables in pycountry and the element data in periodictable (both pinned in requirements.txt), plus a few small
hand-checked tables where those packages say nothing (capitals, which currency a country uses, states of matter,
element classes). Every answer is therefore checkable, the short answers suit exact-match scoring, and the rows carry
the same four task types the evaluation reports on.

Determinism: the same code and package versions give the same list, byte for byte, on any machine: data is iterated
in sorted order, all choices come from one seeded `random.Random`, and nothing depends on set or dict-hash order.
Bump BUNDLED_VERSION whenever the output changes, so a changed data set is visible in metrics/data.json.

Facts that are disputed, recently changed or ambiguous are left out rather than guessed: countries with more than one
legal tender, countries whose seat of government is contested, ISO "official names" (iso-codes lags behind several
renamings), elements whose state or metal class depends on the source.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import periodictable
import pycountry

from alpaca_qlora import io
from alpaca_qlora.records import prompt_key

log = logging.getLogger(__name__)

BUNDLED_VERSION = "2"
SEED = 20240229

TASK_TYPES = ("closed_qa", "factual", "classification", "open_ended")
SHORT_ANSWER_MAX_WORDS = 5
OPEN_ENDED_WORDS = (30, 90)
OPEN_ENDED_SENTENCES = (2, 5)

Row = dict[str, str]

# --------------------------------------------------------------------------------------------------------------------
# Hand-written fact tables. Only entries that are uncontested today are listed; see the module docstring.
# --------------------------------------------------------------------------------------------------------------------

# ISO 3166-1 alpha-2 -> capital city. Left out on purpose (several capitals, a contested or moving seat of government):
# Bolivia, Netherlands, South Africa, Israel, Côte d'Ivoire, Benin, Sri Lanka, Switzerland, Burundi, Montenegro,
# Myanmar, Sudan, Yemen, Eswatini, Malaysia, Tanzania, Indonesia, Egypt, Equatorial Guinea.
CAPITALS: dict[str, str] = {
    "AE": "Abu Dhabi", "AF": "Kabul", "AL": "Tirana", "AM": "Yerevan", "AO": "Luanda", "AR": "Buenos Aires",
    "AT": "Vienna", "AU": "Canberra", "AZ": "Baku", "BA": "Sarajevo", "BD": "Dhaka", "BE": "Brussels",
    "BG": "Sofia", "BH": "Manama", "BR": "Brasília", "BT": "Thimphu", "BW": "Gaborone", "BY": "Minsk",
    "CA": "Ottawa", "CL": "Santiago", "CM": "Yaoundé", "CN": "Beijing", "CO": "Bogotá", "CR": "San José",
    "CU": "Havana", "CY": "Nicosia", "CZ": "Prague", "DE": "Berlin", "DK": "Copenhagen", "DZ": "Algiers",
    "EC": "Quito", "EE": "Tallinn", "ES": "Madrid", "ET": "Addis Ababa", "FI": "Helsinki",
    "FJ": "Suva", "FR": "Paris", "GB": "London", "GE": "Tbilisi", "GH": "Accra", "GR": "Athens",
    "GT": "Guatemala City", "HN": "Tegucigalpa", "HR": "Zagreb", "HU": "Budapest", "IE": "Dublin",
    "IN": "New Delhi", "IQ": "Baghdad", "IR": "Tehran", "IS": "Reykjavík", "IT": "Rome", "JM": "Kingston",
    "JO": "Amman", "JP": "Tokyo", "KE": "Nairobi", "KG": "Bishkek", "KH": "Phnom Penh", "KP": "Pyongyang",
    "KR": "Seoul", "KW": "Kuwait City", "KZ": "Astana", "LA": "Vientiane", "LB": "Beirut", "LT": "Vilnius",
    "LV": "Riga", "LY": "Tripoli", "MA": "Rabat", "MD": "Chișinău", "MG": "Antananarivo", "MK": "Skopje",
    "ML": "Bamako", "MN": "Ulaanbaatar", "MT": "Valletta", "MX": "Mexico City", "MZ": "Maputo", "NA": "Windhoek",
    "NE": "Niamey", "NG": "Abuja", "NI": "Managua", "NO": "Oslo", "NP": "Kathmandu", "NZ": "Wellington",
    "OM": "Muscat", "PA": "Panama City", "PE": "Lima", "PG": "Port Moresby", "PH": "Manila", "PK": "Islamabad",
    "PL": "Warsaw", "PT": "Lisbon", "PY": "Asunción", "QA": "Doha", "RO": "Bucharest", "RS": "Belgrade",
    "RU": "Moscow", "RW": "Kigali", "SA": "Riyadh", "SE": "Stockholm", "SI": "Ljubljana", "SK": "Bratislava",
    "SN": "Dakar", "SY": "Damascus", "TH": "Bangkok", "TJ": "Dushanbe", "TM": "Ashgabat", "TN": "Tunis",
    "TR": "Ankara", "UA": "Kyiv", "UG": "Kampala", "US": "Washington, D.C.", "UY": "Montevideo",
    "UZ": "Tashkent", "VE": "Caracas", "VN": "Hanoi", "WS": "Apia", "ZM": "Lusaka", "ZW": "Harare",
}

# ISO 3166-1 alpha-2 -> ISO 4217 code of the country's sole legal tender. Left out on purpose (more than one legal
# tender, a recent change, or a currency in name only): Bahamas, Bhutan, Bulgaria, Cambodia, Cuba, El Salvador,
# Eswatini, Guatemala, Haiti, Lesotho, Liberia, Macao, Namibia, Nepal, Panama, Singapore, Brunei, Venezuela, Zimbabwe.
_EURO_AREA = ("AD", "AT", "BE", "CY", "DE", "EE", "ES", "FI", "FR", "GR", "HR", "IE", "IT", "LT", "LU", "LV",
              "MC", "ME", "MT", "NL", "PT", "SI", "SK", "SM", "VA")
_CFA_WEST = ("BF", "BJ", "CI", "GW", "ML", "NE", "SN", "TG")
_CFA_CENTRAL = ("CF", "CG", "CM", "GA", "GQ", "TD")
COUNTRY_CURRENCIES: dict[str, str] = {
    **{code: "EUR" for code in _EURO_AREA},
    **{code: "XOF" for code in _CFA_WEST},
    **{code: "XAF" for code in _CFA_CENTRAL},
    "AE": "AED", "AF": "AFN", "AL": "ALL", "AM": "AMD", "AO": "AOA", "AR": "ARS", "AU": "AUD", "AZ": "AZN",
    "BA": "BAM", "BB": "BBD", "BD": "BDT", "BH": "BHD", "BI": "BIF", "BO": "BOB", "BR": "BRL", "BW": "BWP",
    "BY": "BYN", "BZ": "BZD", "CA": "CAD", "CD": "CDF", "CH": "CHF", "CL": "CLP", "CN": "CNY", "CO": "COP",
    "CR": "CRC", "CV": "CVE", "CZ": "CZK", "DJ": "DJF", "DK": "DKK", "DO": "DOP", "DZ": "DZD",
    "EC": "USD", "EG": "EGP", "ER": "ERN", "ET": "ETB", "FJ": "FJD", "GB": "GBP", "GE": "GEL", "GH": "GHS",
    "GM": "GMD", "GN": "GNF", "GY": "GYD", "HK": "HKD", "HN": "HNL", "HU": "HUF", "ID": "IDR",
    "IL": "ILS", "IN": "INR", "IQ": "IQD", "IR": "IRR", "IS": "ISK", "JM": "JMD", "JO": "JOD", "JP": "JPY",
    "KE": "KES", "KG": "KGS", "KM": "KMF", "KP": "KPW", "KR": "KRW", "KW": "KWD", "KZ": "KZT", "LA": "LAK",
    "LB": "LBP", "LI": "CHF", "LK": "LKR", "LY": "LYD", "MA": "MAD", "MD": "MDL", "MG": "MGA", "MK": "MKD",
    "MM": "MMK", "MN": "MNT", "MR": "MRU", "MU": "MUR", "MV": "MVR", "MW": "MWK", "MX": "MXN", "MY": "MYR",
    "MZ": "MZN", "NG": "NGN", "NI": "NIO", "NO": "NOK", "NZ": "NZD", "OM": "OMR", "PE": "PEN", "PG": "PGK",
    "PH": "PHP", "PK": "PKR", "PL": "PLN", "PY": "PYG", "QA": "QAR", "RO": "RON", "RS": "RSD", "RU": "RUB",
    "RW": "RWF", "SA": "SAR", "SB": "SBD", "SC": "SCR", "SD": "SDG", "SE": "SEK", "SL": "SLE", "SO": "SOS",
    "SR": "SRD", "SS": "SSP", "ST": "STN", "SY": "SYP", "TH": "THB", "TJ": "TJS", "TM": "TMT", "TN": "TND",
    "TO": "TOP", "TR": "TRY", "TT": "TTD", "TW": "TWD", "TZ": "TZS", "UA": "UAH", "UG": "UGX", "US": "USD",
    "UY": "UYU", "UZ": "UZS", "VN": "VND", "VU": "VUV", "WS": "WST", "YE": "YER", "ZA": "ZAR", "ZM": "ZMW",
}

# ISO 4217 entries that are funds, precious metals, bond-market units, testing or "no currency" codes.
NON_CURRENCY_CODES = frozenset({
    "BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "UYI", "UYW", "XAD", "XAG", "XAU", "XBA", "XBB", "XBC",
    "XBD", "XDR", "XPD", "XPT", "XSU", "XTS", "XUA", "XXX",
})

# States of matter at room temperature (25 °C) for elements 1-92. Gallium and caesium (melting near room
# temperature), astatine and francium (never observed in bulk) are left out; all others not listed are solids.
GASES = frozenset({"H", "He", "N", "O", "F", "Ne", "Cl", "Ar", "Kr", "Xe", "Rn"})
LIQUIDS = frozenset({"Br", "Hg"})
STATE_UNSETTLED = frozenset({"Ga", "Cs", "At", "Fr"})

# Metal / nonmetal / metalloid for elements 1-92 (the six commonly recognised metalloids). Selenium, polonium and
# astatine are classed differently by different sources and are left out; all others not listed are metals.
NONMETALS = frozenset({"H", "He", "C", "N", "O", "F", "Ne", "P", "S", "Cl", "Ar", "Br", "Kr", "I", "Xe", "Rn"})
METALLOIDS = frozenset({"B", "Si", "Ge", "As", "Sb", "Te"})
CLASS_UNSETTLED = frozenset({"Se", "Po", "At"})

# Element families (the superheavy members tennessine and oganesson are left out: their chemistry is unknown).
FAMILIES: dict[str, tuple[str, ...]] = {
    "alkali metal": ("Li", "Na", "K", "Rb", "Cs", "Fr"),
    "alkaline earth metal": ("Be", "Mg", "Ca", "Sr", "Ba", "Ra"),
    "halogen": ("F", "Cl", "Br", "I", "At"),
    "noble gas": ("He", "Ne", "Ar", "Kr", "Xe", "Rn"),
}
LANTHANIDES = range(57, 72)
ACTINIDES = range(89, 104)
PERIOD_ENDS = (2, 10, 18, 36, 54, 86, 118)
CLASSIFIED_MAX_NUMBER = 92  # states and metal classes are only asked for the naturally studied elements


# --------------------------------------------------------------------------------------------------------------------
# Facts, loaded from the packages and the tables above.
# --------------------------------------------------------------------------------------------------------------------

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


# Which ISO 3166-2 subdivisions are asked about, and how they are named in a question.
REGION_KINDS: dict[tuple[str, str], str] = {
    ("US", "State"): "the US state of",
    ("CA", "Province"): "the Canadian province of",
    ("CA", "Territory"): "the Canadian territory of",
    ("AU", "State"): "the Australian state of",
    ("AU", "Territory"): "the Australian territory",
    ("BR", "State"): "the Brazilian state of",
    ("IN", "State"): "the Indian state of",
    ("MX", "State"): "the Mexican state of",
    ("DE", "Land"): "the German state of",
}


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


# --------------------------------------------------------------------------------------------------------------------
# Questions: one fact, several phrasings, a short answer and a sentence that states it (for passages).
# --------------------------------------------------------------------------------------------------------------------

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


def word_count(text: str) -> int:
    return len(text.split())


def is_short(answer: str) -> bool:
    return word_count(answer) <= SHORT_ANSWER_MAX_WORDS


def country_questions(country: Country) -> list[Question]:
    name, questions = country.name, []
    questions.append(Question(
        "country_alpha_2",
        (f"What is the ISO 3166-1 alpha-2 code of {name}?", f"Give the two-letter ISO country code for {name}.",
         f"Which two-letter code does ISO 3166-1 assign to {name}?", f"What is {name}'s alpha-2 country code?"),
        country.alpha_2, f"The ISO 3166-1 alpha-2 code of {name} is {country.alpha_2}.", "ISO 3166-1 alpha-2 code"))
    questions.append(Question(
        "country_alpha_3",
        (f"What is the ISO 3166-1 alpha-3 code of {name}?", f"Give the three-letter ISO country code for {name}.",
         f"Which alpha-3 code identifies {name} in ISO 3166-1?", f"What is {name}'s three-letter country code?"),
        country.alpha_3, f"{name} has the ISO 3166-1 alpha-3 code {country.alpha_3}.", "ISO 3166-1 alpha-3 code"))
    questions.append(Question(
        "country_numeric",
        (f"What is the ISO 3166-1 numeric code of {name}?", f"Which three-digit ISO 3166-1 code belongs to {name}?",
         f"Give the numeric country code of {name} in ISO 3166-1."),
        country.numeric, f"In ISO 3166-1, the numeric code of {name} is {country.numeric}.",
        "ISO 3166-1 numeric code"))
    if country.capital:
        questions.append(Question(
            "country_capital",
            (f"What is the capital of {name}?", f"Name the capital city of {name}.",
             f"Which city is the capital of {name}?"),
            country.capital, f"The capital of {name} is {country.capital}.", "Capital"))
    if country.currency:
        currency = country.currency
        questions.append(Question(
            "country_currency",
            (f"What is the currency of {name}?", f"Which currency is used in {name}?",
             f"Name the official currency of {name}.", f"What currency does {name} use?"),
            currency.name, f"The currency of {name} is the {currency.name} ({currency.code}).", "Currency"))
    return [question for question in questions if is_short(question.answer)]


def country_reverse_questions(country: Country) -> list[Question]:
    """Questions whose answer is the country: only asked where the name is short enough for exact match."""
    if not is_short(country.name):
        return []
    name, questions = country.name, []
    questions.append(Question(
        "country_from_alpha_2",
        (f"Which country or territory has the ISO 3166-1 alpha-2 code {country.alpha_2}?",
         f"The two-letter ISO country code {country.alpha_2} stands for which country or territory?",
         f"Name the country or territory whose alpha-2 code is {country.alpha_2}."),
        name, f"The ISO 3166-1 alpha-2 code of {name} is {country.alpha_2}.", "Name"))
    questions.append(Question(
        "country_from_alpha_3",
        (f"Which country or territory has the ISO 3166-1 alpha-3 code {country.alpha_3}?",
         f"What does the three-letter ISO country code {country.alpha_3} stand for?"),
        name, f"{name} has the ISO 3166-1 alpha-3 code {country.alpha_3}.", "Name"))
    if country.capital:
        questions.append(Question(
            "country_from_capital",
            (f"{country.capital} is the capital of which country?",
             f"Of which country is {country.capital} the capital?",
             f"Which country has {country.capital} as its capital?"),
            name, f"The capital of {name} is {country.capital}.", "Name"))
    return questions


def element_questions(element: Element) -> list[Question]:
    name, title, questions = element.name, element.title, []
    questions.append(Question(
        "element_symbol",
        (f"What is the chemical symbol for {name}?", f"Give the element symbol of {name}.",
         f"Which symbol represents {name} on the periodic table?", f"What is {name}'s chemical symbol?"),
        element.symbol, f"The chemical symbol of {name} is {element.symbol}.", "Symbol"))
    questions.append(Question(
        "element_number",
        (f"What is the atomic number of {name}?", f"How many protons does an atom of {name} have?",
         f"Give the atomic number of {name}.", f"What is {name}'s atomic number?"),
        str(element.number), f"{title} has atomic number {element.number}.", "Atomic number"))
    questions.append(Question(
        "element_period",
        (f"In which period of the periodic table is {name}?",
         f"Which period (row) of the periodic table contains {name}?",
         f"What period is {name} in? Answer with a number."),
        str(element.period), f"{title} is in period {element.period} of the periodic table.", "Period"))
    if element.group is not None:
        questions.append(Question(
            "element_group",
            (f"Which group of the periodic table is {name} in?", f"What is the group number of {name}?",
             f"In which IUPAC group (1-18) is {name}?"),
            str(element.group), f"{title} belongs to group {element.group}.", "Group"))
    if element.atomic_weight is not None:
        weight = format_weight(element.atomic_weight)
        questions.append(Question(
            "element_weight",
            (f"What is the standard atomic weight of {name}?",),
            weight, f"The standard atomic weight of {name} is about {weight}.", "Standard atomic weight"))
    if element.state is not None:
        questions.append(Question(
            "element_state",
            (f"Is {name} a solid, a liquid or a gas at room temperature?",),
            element.state, f"At room temperature {name} is a {element.state}.", "State at room temperature"))
    return questions


def element_reverse_questions(element: Element) -> list[Question]:
    title = element.title
    return [
        Question(
            "element_from_symbol",
            (f"Which element has the chemical symbol {element.symbol}?",
             f"What element does the symbol {element.symbol} stand for?",
             f"Name the element whose symbol is {element.symbol}."),
            title, f"The chemical symbol of {element.name} is {element.symbol}.", "Name"),
        Question(
            "element_from_number",
            (f"Which element has atomic number {element.number}?",
             f"Name the element with atomic number {element.number}.",
             f"What is element number {element.number} of the periodic table?"),
            title, f"{title} has atomic number {element.number}.", "Name"),
    ]


def rounded_weight_question(element: Element) -> Question | None:
    """Standard atomic weight to the nearest whole number; skipped where the value sits near a rounding boundary."""
    weight = element.atomic_weight
    if weight is None or abs(weight - math.floor(weight) - 0.5) < 0.1:
        return None
    rounded = str(round(weight))
    return Question(
        "element_weight_rounded",
        (f"What is the atomic weight of {element.name}, rounded to the nearest whole number?",
         f"Rounded to a whole number, what is the standard atomic weight of {element.name}?"),
        rounded, f"The standard atomic weight of {element.name} is about {rounded}.", "Atomic weight")


def currency_questions(currency: Currency, ambiguous_names: frozenset[str]) -> list[Question]:
    questions = [Question(
        "currency_numeric",
        (f"What is the ISO 4217 numeric code of the currency {currency.code}?",
         f"Which three-digit ISO 4217 code belongs to {currency.code}?"),
        currency.numeric, f"The ISO 4217 numeric code of {currency.code} is {currency.numeric}.",
        "ISO 4217 numeric code")]
    if currency.name not in ambiguous_names:
        questions.append(Question(
            "currency_code",
            (f"What is the ISO 4217 code of the {currency.name}?",
             f"Give the three-letter currency code of the {currency.name}.",
             f"Which ISO 4217 code is used for the {currency.name}?"),
            currency.code, f"The ISO 4217 code of the {currency.name} is {currency.code}.", "ISO 4217 code"))
        if is_short(currency.name):
            questions.append(Question(
                "currency_from_code",
                (f"Which currency has the ISO 4217 code {currency.code}?",
                 f"What currency does the code {currency.code} stand for?",
                 f"Name the currency with ISO 4217 code {currency.code}."),
                currency.name, f"The ISO 4217 code of the {currency.name} is {currency.code}.", "Name"))
    return questions


def language_questions(language: Language) -> list[Question]:
    name, questions = language.name, []
    questions.append(Question(
        "language_alpha_2",
        (f"What is the ISO 639-1 code for {name}?", f"Give the two-letter ISO 639-1 language code of {name}.",
         f"Which two-letter code does ISO 639-1 assign to the {name} language?"),
        language.alpha_2, f"The ISO 639-1 code of {name} is {language.alpha_2}.", "ISO 639-1 code"))
    questions.append(Question(
        "language_alpha_3",
        (f"What is the ISO 639-3 code for {name}?", f"Give the three-letter ISO 639-3 code of the {name} language."),
        language.alpha_3, f"{name} has the ISO 639-3 code {language.alpha_3}.", "ISO 639-3 code"))
    if language.bibliographic:
        questions.append(Question(
            "language_bibliographic",
            (f"What is the ISO 639-2 bibliographic code for {name}?",
             f"Which ISO 639-2/B (bibliographic) code is used for {name}?"),
            language.bibliographic, f"The ISO 639-2 bibliographic code of {name} is {language.bibliographic}.",
            "ISO 639-2/B code"))
    return questions


def language_reverse_questions(language: Language) -> list[Question]:
    return [Question(
        "language_from_alpha_2",
        (f"Which language has the ISO 639-1 code '{language.alpha_2}'?",
         f"What language does the ISO 639-1 code '{language.alpha_2}' stand for?"),
        language.name, f"The ISO 639-1 code of {language.name} is {language.alpha_2}.", "Name")]


def script_questions(script: Script) -> list[Question]:
    return [
        Question(
            "script_code",
            (f"What is the ISO 15924 code of the {script.name} script?",
             f"Give the four-letter ISO 15924 code for the {script.name} script."),
            script.code, f"The ISO 15924 code of the {script.name} script is {script.code}.", "ISO 15924 code"),
        Question(
            "script_from_code",
            (f"Which writing system has the ISO 15924 code {script.code}?",
             f"What script does the ISO 15924 code {script.code} stand for?"),
            script.name, f"The ISO 15924 code of the {script.name} script is {script.code}.", "Name"),
    ]


def region_questions(phrase: str, region: Subdivision) -> list[Question]:
    kind = phrase.removeprefix("the ").removesuffix(" of")
    return [
        Question(
            "region_code",
            (f"What is the ISO 3166-2 code of {phrase} {region.name}?",
             f"Give the ISO 3166-2 subdivision code for {region.name} ({kind})."),
            region.code, f"The ISO 3166-2 code of {region.name} is {region.code}.", "ISO 3166-2 code"),
        Question(
            "region_from_code",
            (f"Which subdivision has the ISO 3166-2 code {region.code}?",
             f"What place does the ISO 3166-2 code {region.code} stand for?"),
            region.name, f"The ISO 3166-2 code of {region.name} is {region.code}.", "Name"),
    ]


def format_weight(weight: float) -> str:
    """Two decimals, rounded half up on the decimal value (173.045 -> 173.05, where float formatting gives 173.04)."""
    return str(Decimal(repr(weight)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


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


# --------------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------------

def make_row(instruction: str, input_text: str, output: str, task_type: str) -> Row:
    return {"instruction": instruction, "input": input_text, "output": output, "task_type": task_type}


def take(rng: random.Random, pool: Sequence, count: int) -> list:
    """A seeded sample, in pool order, so the rows keep the (sorted) order of their facts."""
    if count >= len(pool):
        return list(pool)
    chosen = set(rng.sample(range(len(pool)), count))
    return [item for index, item in enumerate(pool) if index in chosen]


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
        rounded = rounded_weight_question(element)
        questions += element_questions(element) + element_reverse_questions(element) + ([rounded] if rounded else [])
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


# --- closed_qa: the answer is in the input ---------------------------------------------------------------------------

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


# --- classification: a label from a stated set ----------------------------------------------------------------------

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


def state_rows(facts: Facts, rng: random.Random) -> list[Row]:
    known = [element for element in facts.elements if element.state is not None]
    return [labelled(
        rng, element.title if rng.random() < 0.8 else f"{element.title} ({element.symbol})", element.state,
        ("Is {item} a solid, a liquid or a gas at room temperature?",
         "At room temperature, is {item} solid, liquid or gas? Answer with one word.",
         "Classify {item} by its state at room temperature: solid, liquid or gas."),
        ("Classify the following element by its state at room temperature: solid, liquid or gas.",
         "Is this element a solid, liquid or gas at room temperature? Answer with one word.",
         "Label the element below as solid, liquid or gas (its state at 25 °C)."),
        mention=element.name,
    ) for element in balanced(rng, known, lambda element: element.state, 45)]


def metal_class_rows(facts: Facts, rng: random.Random) -> list[Row]:
    known = [element for element in facts.elements if element.metal_class is not None]
    return [labelled(
        rng, element.title, element.metal_class,
        ("Is {item} a metal, a nonmetal or a metalloid?",
         "Classify {item} as a metal, nonmetal or metalloid.",
         "Which class does {item} belong to: metal, nonmetal or metalloid?"),
        ("Classify the element as a metal, nonmetal or metalloid.",
         "Label this chemical element: metal, nonmetal or metalloid?",
         "Decide whether the following element is a metal, a nonmetal or a metalloid."),
        mention=element.name,
    ) for element in balanced(rng, known, lambda element: element.metal_class, 40)]


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


def is_prime(number: int) -> bool:
    return number >= 2 and all(number % divisor for divisor in range(2, math.isqrt(number) + 1))


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
    rows, used = [], set()
    elements = facts.elements[:CLASSIFIED_MAX_NUMBER]
    while len(rows) < count:
        first, second = rng.sample(elements, 2)
        key = tuple(sorted((first.number, second.number)))
        if key in used:
            continue
        used.add(key)
        larger = max(first, second, key=lambda element: element.number)
        question = rng.choice(("Which has the higher atomic number, {a} or {b}?",
                               "Which element has more protons: {a} or {b}?",
                               "Of {a} and {b}, which comes later in the periodic table?"))
        rows.append(make_row(question.format(a=first.name, b=second.name), "", larger.title, "classification"))
    return rows


def classification_rows(facts: Facts, rng: random.Random) -> list[Row]:
    rows = state_rows(facts, rng) + metal_class_rows(facts, rng) + family_rows(facts, rng) + number_rows(rng)
    rows += category_rows(facts, rng, 80)
    rows += atomic_number_comparison_rows(facts, rng, 55)
    return rows


# --- open_ended: a few sentences composed from facts ----------------------------------------------------------------

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
    rows, compared = [], set()
    while len(rows) < count:
        first, second = rng.sample(comparable, 2)
        pair = tuple(sorted((first.number, second.number)))
        if pair in compared:
            continue
        compared.add(pair)
        rows.append(open_row(rng.choice(asks).format(a=first.name, b=second.name), "",
                             element_comparison(first, second)))
    return rows


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


# --------------------------------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------------------------------

def check_rows(rows: Sequence[Row]) -> None:
    """Refuse to ship a set that breaks its own contract (a bug here would otherwise surface as odd metrics)."""
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        if row["task_type"] not in TASK_TYPES or not row["instruction"].strip() or not row["output"].strip():
            raise ValueError(f"bundled row {index} is malformed: {row}")
        if row["task_type"] != "open_ended" and not is_short(row["output"]):
            raise ValueError(f"bundled row {index} has a short-answer task type but a long output: {row}")
        low, high = OPEN_ENDED_WORDS
        if row["task_type"] == "open_ended" and not low <= word_count(row["output"]) <= high:
            raise ValueError(f"bundled row {index} is open-ended but {word_count(row['output'])} words long: {row}")
        key = prompt_key(row)
        if key in seen:
            raise ValueError(f"bundled rows {seen[key]} and {index} ask the same prompt: {row['instruction']!r}")
        seen[key] = index


def generate_rows() -> list[Row]:
    """The bundled data set: identical for identical code and package versions."""
    facts = load_facts()
    rng = random.Random(SEED)
    rows = factual_rows(facts, rng) + closed_qa_rows(facts, rng) + classification_rows(facts, rng)
    rows += open_ended_rows(facts, rng)
    rng.shuffle(rows)
    check_rows(rows)
    log.debug("bundled rows by task type: %s", dict(sorted(Counter(row["task_type"] for row in rows).items())))
    return rows


def render_rows(rows: Sequence[Row]) -> str:
    return json.dumps(list(rows), indent=2, ensure_ascii=False) + "\n"


def write_rows(path: str | Path) -> int:
    """Write the bundled set as a JSON array (atomically); return the number of rows."""
    rows = generate_rows()
    io.write_text(path, render_rows(rows))
    return len(rows)


def main(argv: Sequence[str] | None = None) -> None:
    from alpaca_qlora.stage import configure_logging

    parser = argparse.ArgumentParser(description="Write the bundled Alpaca-format data set as a JSON array.")
    parser.add_argument("out", type=Path, help="where to write the JSON file")
    args = parser.parse_args(argv)
    configure_logging()
    count = write_rows(args.out)
    log.info("wrote %d rows (bundled data set version %s) to %s", count, BUNDLED_VERSION, args.out)


if __name__ == "__main__":
    main()
