import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import periodictable
import pytest

from alpaca_qlora.data.bundled import BUNDLED_VERSION, generate_rows, write_rows
from alpaca_qlora.data.bundled.dataset import main
from alpaca_qlora.data.bundled.facts import format_weight, group_of, load_facts, period_of
from alpaca_qlora.data.bundled.questions import country_questions, country_reverse_questions, element_questions
from alpaca_qlora.data.records import clean_rows, prompt_key
from support import ROOT

EXACT_MATCH_TYPES = {"closed_qa", "factual", "classification"}

# Checked by hand, independently of the generator's tables.
SYMBOLS = {"sodium": "Na", "potassium": "K", "iron": "Fe", "gold": "Au", "silver": "Ag", "lead": "Pb", "tin": "Sn",
           "mercury": "Hg", "tungsten": "W", "copper": "Cu", "carbon": "C", "oxygen": "O", "helium": "He",
           "neon": "Ne", "chlorine": "Cl", "calcium": "Ca", "zinc": "Zn", "uranium": "U", "iodine": "I"}
ATOMIC_NUMBERS = {"hydrogen": "1", "helium": "2", "carbon": "6", "oxygen": "8", "sodium": "11", "iron": "26",
                  "silver": "47", "gold": "79", "mercury": "80", "lead": "82", "uranium": "92", "oganesson": "118"}
STATES = {"mercury": "liquid", "bromine": "liquid", "neon": "gas", "chlorine": "gas", "nitrogen": "gas",
          "iron": "solid", "iodine": "solid", "sulfur": "solid", "sodium": "solid", "carbon": "solid"}
METAL_CLASSES = {"silicon": "metalloid", "boron": "metalloid", "arsenic": "metalloid", "carbon": "nonmetal",
                 "sulfur": "nonmetal", "iron": "metal", "aluminum": "metal", "sodium": "metal"}
COUNTRY_CODES = {"Norway": ("NO", "NOR", "578"), "Japan": ("JP", "JPN", "392"), "Germany": ("DE", "DEU", "276"),
                 "Brazil": ("BR", "BRA", "076"), "Kenya": ("KE", "KEN", "404"), "Canada": ("CA", "CAN", "124"),
                 "Portugal": ("PT", "PRT", "620"), "India": ("IN", "IND", "356"), "Mexico": ("MX", "MEX", "484")}
CAPITALS = {"Norway": "Oslo", "France": "Paris", "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra",
            "Kenya": "Nairobi", "Peru": "Lima", "Poland": "Warsaw", "Germany": "Berlin", "Thailand": "Bangkok"}
CURRENCIES = {"Norway": "Norwegian Krone", "Japan": "Yen", "Germany": "Euro", "France": "Euro",
              "Canada": "Canadian Dollar", "United Kingdom": "Pound Sterling", "Brazil": "Brazilian Real",
              "Poland": "Zloty", "India": "Indian Rupee", "Ecuador": "US Dollar", "Sweden": "Swedish Krona"}


@pytest.fixture(scope="module")
def rows():
    return generate_rows()


@pytest.fixture(scope="module")
def facts():
    return load_facts()


def short_answer_rows(rows):
    return [row for row in rows if row["task_type"] in EXACT_MATCH_TYPES]


def test_size_and_task_type_mix(rows):
    assert len(rows) >= 2000
    counts = Counter(row["task_type"] for row in rows)
    assert set(counts) == {"closed_qa", "factual", "classification", "open_ended"}
    assert 0.15 <= counts["open_ended"] / len(rows) <= 0.25
    assert min(counts.values()) >= 300


def test_rows_are_alpaca_shaped_and_survive_validation_untouched(rows):
    for row in rows:
        assert list(row) == ["instruction", "input", "output", "task_type"]
        assert all(isinstance(value, str) for value in row.values())
        assert row["instruction"].strip() and row["output"].strip()
    kept, report = clean_rows(rows)
    assert report.kept == len(rows) and not report.dropped


def test_no_two_rows_ask_the_same_prompt_even_after_normalisation(rows):
    assert len({(row["instruction"], row["input"]) for row in rows}) == len(rows)
    assert len({prompt_key(row) for row in rows}) == len(rows)


def test_inputs_follow_the_task_type(rows):
    with_input = Counter(row["task_type"] for row in rows if row["input"])
    assert with_input["closed_qa"] == sum(row["task_type"] == "closed_qa" for row in rows)
    assert with_input["factual"] == 0
    assert 0.25 <= sum(with_input.values()) / len(rows) <= 0.5
    assert 0 < with_input["classification"] < sum(row["task_type"] == "classification" for row in rows)


def test_phrasings_vary(rows):
    """No single instruction template may dominate: mask names and numbers, count the remaining shapes."""
    shapes = Counter(re.sub(r"\b[A-Z0-9][\w'’-]*", "X", row["instruction"]) for row in rows)
    assert len(shapes) >= 150
    assert shapes.most_common(1)[0][1] / len(rows) < 0.05


def test_exact_match_rows_have_short_references_and_open_rows_long_ones(rows):
    assert max(len(row["output"].split()) for row in short_answer_rows(rows)) <= 5
    open_lengths = [len(row["output"].split()) for row in rows if row["task_type"] == "open_ended"]
    assert min(open_lengths) >= 30 and max(open_lengths) <= 90
    sentences = [len(re.findall(r"[.!?](?=\s|$)", row["output"])) for row in rows if row["task_type"] == "open_ended"]
    assert min(sentences) >= 2 and max(sentences) <= 6  # 6: "Washington, D.C." ends one sentence early


def test_closed_qa_answers_are_in_the_input(rows):
    for row in rows:
        if row["task_type"] == "closed_qa":
            assert row["output"] in row["input"], row


def test_write_ups_from_notes_add_no_codes_or_numbers_of_their_own(rows):
    noted = [row for row in rows if row["task_type"] == "open_ended" and row["input"]]
    assert len(noted) >= 50
    for row in noted:
        text = re.sub(r"ISO \d+(?:-\d)?", "", row["output"])  # the standards' names are not facts
        for token in re.findall(r"\b(?:[A-Z]{2,4}|\d[\d.]*\d|\d)\b", text):
            assert token in row["input"], (token, row)


def test_classification_labels_come_from_the_set_stated_in_the_prompt(rows):
    for row in rows:
        if row["task_type"] == "classification":
            assert row["output"].casefold() in (row["instruction"] + " " + row["input"]).casefold(), row


def test_classification_labels_are_not_all_one_answer(rows):
    for pair in (("prime", "composite"), ("even", "odd"), ("yes", "no")):
        counts = Counter(row["output"] for row in rows
                         if row["output"] in pair and row["task_type"] == "classification")
        assert min(counts[label] for label in pair) >= 0.3 * sum(counts.values()), counts


def number_in(row):
    return int(re.search(r"\d+", row["input"] or row["instruction"]).group())


def is_prime(number):
    return number > 1 and all(number % divisor for divisor in range(2, number))


def test_number_labels_are_right(rows):
    checked = 0
    for row in rows:
        prompt = row["instruction"] + " " + row["input"]
        if row["task_type"] != "classification":
            continue
        if "prime or composite" in prompt:
            assert row["output"] == ("prime" if is_prime(number_in(row)) else "composite"), row
        elif "even or odd" in prompt or "even or an odd" in prompt:
            assert row["output"] == ("even" if number_in(row) % 2 == 0 else "odd"), row
        elif "divisible by" in prompt or "divided by" in prompt or "multiple of" in prompt:
            divisor = int(re.search(r"(?:divisible by|divided by|multiple of) (\d+)", prompt).group(1))
            number = int(row["input"]) if row["input"] else int(re.search(r"\d+", row["instruction"]).group())
            assert row["output"] == ("yes" if number % divisor == 0 else "no"), row
        else:
            continue
        checked += 1
    assert checked >= 150


def test_element_rows_agree_with_periodictable(rows):
    """Every symbol / atomic-number question, for any element, gives periodictable's answer."""
    symbols = {element.name: element.symbol for element in periodictable.elements if element.number}
    numbers = {element.name: str(element.number) for element in periodictable.elements if element.number}
    checks = ((("symbol for", "symbol of", "symbol represents", "chemical symbol?"), symbols),
              (("atomic number of", "protons does an atom of", "'s atomic number"), numbers))
    checked = 0
    for row in short_answer_rows(rows):
        for phrases, answers in checks:
            if any(phrase in row["instruction"] for phrase in phrases):
                named = [name for name in answers if re.search(rf"\b{name}\b", row["instruction"])]
                assert len(named) == 1 and row["output"] == answers[named[0]], row
                checked += 1
    assert checked >= 100


def test_element_classes_are_right(rows):
    known = 0
    for row in rows:
        if row["task_type"] != "classification":
            continue
        prompt = row["instruction"] + " " + row["input"]
        item = (row["input"].split(" (")[0] or "").casefold()
        for table, marker in ((STATES, "liquid"), (METAL_CLASSES, "metalloid")):
            if marker not in prompt:
                continue
            for name, label in table.items():
                if item == name or (not item and re.search(rf"\b{name}\b", row["instruction"], re.IGNORECASE)):
                    assert row["output"] == label, row
                    known += 1
    assert known >= 5


def test_country_facts_are_right(rows):
    known = 0
    for row in rows:
        if row["task_type"] not in ("factual", "closed_qa"):
            continue
        instruction = row["instruction"]
        for country, (alpha_2, alpha_3, numeric) in COUNTRY_CODES.items():
            if not re.search(rf"\b{country}\b", instruction):
                continue
            expected = (alpha_2 if "alpha-2" in instruction or "two-letter" in instruction
                        else alpha_3 if "alpha-3" in instruction or "three-letter" in instruction
                        else numeric if "numeric" in instruction or "three-digit" in instruction
                        else None)
            if expected is not None:
                assert row["output"] == expected, row
                known += 1
        if "capital" in instruction:
            for country, capital in CAPITALS.items():
                if re.search(rf"\b{country}\b", instruction):
                    assert row["output"] == capital, row
                    known += 1
                elif re.search(rf"\b{capital}\b", instruction):
                    assert row["output"] == country, row
                    known += 1
        if "currency" in instruction and "ISO 4217" not in instruction:
            for country, currency in CURRENCIES.items():
                if re.search(rf"\b{country}\b", instruction):
                    assert row["output"] == currency, row
                    known += 1
    assert known >= 15


def test_loaded_element_facts_are_right(facts):
    """The facts every element row is drawn from, whether or not the seeded sample happens to ask about them."""
    elements = {element.name: element for element in facts.elements}
    assert {name: elements[name].symbol for name in SYMBOLS} == SYMBOLS
    assert {name: str(elements[name].number) for name in ATOMIC_NUMBERS} == ATOMIC_NUMBERS
    assert {name: elements[name].state for name in STATES} == STATES
    assert {name: elements[name].metal_class for name in METAL_CLASSES} == METAL_CLASSES
    assert elements["gallium"].state is None and elements["selenium"].metal_class is None  # unsettled: not asked
    assert [elements[name].family for name in ("lithium", "barium", "fluorine", "xenon", "cerium", "uranium")] == [
        "alkali metal", "alkaline earth metal", "halogen", "noble gas", "lanthanide", "actinide"]


def test_loaded_country_facts_are_right(facts):
    countries = {country.name: country for country in facts.countries}
    assert {name: (countries[name].alpha_2, countries[name].alpha_3, countries[name].numeric)
            for name in COUNTRY_CODES} == COUNTRY_CODES
    assert {name: countries[name].capital for name in CAPITALS} == CAPITALS
    assert {name: countries[name].currency.name for name in CURRENCIES} == CURRENCIES
    # Several legal tenders or a contested seat of government: left out rather than guessed.
    assert countries["Panama"].currency is None and countries["El Salvador"].currency is None
    assert countries["Netherlands"].capital is None and countries["Bolivia"].capital is None


def test_derived_element_facts():
    assert [period_of(number) for number in (1, 2, 3, 10, 11, 19, 55, 86, 87, 118)] == [1, 1, 2, 2, 3, 4, 6, 6, 7, 7]
    groups = {1: 1, 2: 18, 3: 1, 5: 13, 10: 18, 13: 13, 26: 8, 30: 12, 31: 13, 56: 2, 72: 4, 79: 11, 86: 18,
              88: 2, 104: 4, 118: 18}
    assert {number: group_of(number) for number in groups} == groups
    assert group_of(57) is None and group_of(71) is None and group_of(92) is None and group_of(103) is None


def test_weights_round_half_up_on_the_decimal_value():
    assert format_weight(173.045) == "173.05"  # float formatting would say 173.04
    assert format_weight(22.98976928) == "22.99" and format_weight(207.2) == "207.20"


def test_generation_is_deterministic_byte_for_byte(tmp_path, rows):
    assert generate_rows() == rows
    assert write_rows(tmp_path / "a.json") == len(rows)
    main([str(tmp_path / "b.json")])
    first, second = (tmp_path / "a.json").read_bytes(), (tmp_path / "b.json").read_bytes()
    assert first == second
    assert first.endswith(b"]\n") and "í".encode() in first  # e.g. Reykjavík / Bogotá, written unescaped
    assert json.loads(first) == rows
    assert isinstance(BUNDLED_VERSION, str) and BUNDLED_VERSION


def test_output_does_not_depend_on_hash_seed():
    """Set or dict-hash order leaking into the rows would show up as different bytes under another PYTHONHASHSEED."""
    script = ("import hashlib, json; from alpaca_qlora.data.bundled import generate_rows; "
              "print(hashlib.sha256(json.dumps(generate_rows()).encode()).hexdigest())")
    digests = set()
    for seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONHASHSEED": seed})
        digests.add(result.stdout.strip())
    assert len(digests) == 1
    assert digests == {hashlib.sha256(json.dumps(generate_rows()).encode()).hexdigest()}


def test_an_ask_is_asked_only_where_every_fact_it_names_is_known(facts):
    """The question tables skip a question whose answer or wording needs a fact the subject lacks."""
    countries = {country.name: country for country in facts.countries}
    elements = {element.name: element for element in facts.elements}

    def families(questions):
        return {question.family for question in questions}

    assert {"country_capital", "country_currency"} <= families(country_questions(countries["Norway"]))
    assert "country_capital" not in families(country_questions(countries["Netherlands"]))
    assert "country_currency" not in families(country_questions(countries["Panama"]))
    assert "country_from_capital" not in families(country_reverse_questions(countries["Netherlands"]))
    assert "element_group" in families(element_questions(elements["iron"]))
    assert "element_group" not in families(element_questions(elements["cerium"]))  # a lanthanide: no group
    assert "element_weight" not in families(element_questions(elements["technetium"]))  # no standard weight
    for question in country_questions(countries["Norway"]) + element_questions(elements["cerium"]):
        assert "None" not in question.statement and all("None" not in text for text in question.phrasings)
