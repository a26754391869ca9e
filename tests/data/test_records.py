import json

import pytest

from alpaca_qlora.data.records import (
    DataFormatError,
    check_alpaca_shape,
    clean_rows,
    prompt_key,
    read_rows,
)

GOOD = {"instruction": "Name a prime.", "input": "", "output": "2"}


def test_bad_rows_are_dropped_and_counted_by_reason():
    rows = [
        GOOD,
        dict(GOOD),  # exact duplicate
        {"instruction": "  ", "input": "", "output": "x"},
        {"instruction": "Q", "input": "", "output": " \n"},
        {"instruction": "Q", "output": "x"},
        {"instruction": "Q", "input": "", "output": 3},
        {"instruction": ["Q"], "input": "", "output": "x"},
        {"instruction": "Q", "input": 7, "output": "x"},
        {"instruction": "Q", "input": "", "output": "x", "task_type": 5},
        "just a string",
        {"instruction": "Name a prime.", "input": "", "output": "3"},  # same prompt, other answer: kept
    ]
    kept, report = clean_rows(rows)
    assert [row["output"] for row in kept] == ["2", "3"]
    assert report.as_dict() == {
        "rows_read": 11,
        "rows_kept": 2,
        "rows_dropped": {  # each reason names the field at fault
            "duplicate": 1,
            "empty_instruction": 1,
            "empty_output": 1,
            "missing_input": 1,
            "non_string_input": 1,
            "non_string_instruction": 1,
            "non_string_output": 1,
            "non_string_task_type": 1,
            "not_an_object": 1,
        },
    }
    assert len({row["id"] for row in kept}) == 2


def test_a_null_input_is_an_empty_input():
    """alpaca-cleaned's consumers read `input: null` as no input; dropping such rows lost whole data sets."""
    kept, report = clean_rows([{"instruction": "Name a prime.", "input": None, "output": "2"}])
    assert report.as_dict()["rows_dropped"] == {}
    assert kept == clean_rows([GOOD])[0]


def test_a_byte_order_mark_is_not_data(tmp_path):
    rows = [GOOD]
    for name, text in (("rows.json", json.dumps(rows)), ("rows.jsonl", json.dumps(GOOD) + "\n")):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
        assert (tmp_path / name).read_bytes().startswith(b"\xef\xbb\xbf")
        assert read_rows(tmp_path / name) == rows


def test_ids_do_not_depend_on_order_and_task_type_is_kept():
    rows = [GOOD, {"instruction": "b", "input": "c", "output": "d", "task_type": "factual"}]
    forward, _ = clean_rows(rows)
    backward, _ = clean_rows(list(reversed(rows)))
    assert {r["id"] for r in forward} == {r["id"] for r in backward}
    assert [r for r in forward if r.get("task_type")][0]["task_type"] == "factual"


def test_wrong_columns_are_refused_with_what_was_found():
    with pytest.raises(DataFormatError, match="columns found: answer, question"):
        check_alpaca_shape([{"question": "q", "answer": "a"}], "qa.json")
    with pytest.raises(DataFormatError, match="not JSON objects"):
        check_alpaca_shape([1, 2], "numbers.json")
    with pytest.raises(DataFormatError, match="no rows"):
        check_alpaca_shape([], "empty.json")


def test_reading_json_jsonl_and_parquet(tmp_path):
    rows = [GOOD, {"instruction": "a", "input": "b", "output": "c"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("rows.json", "rows.jsonl", "rows.parquet"):
        assert read_rows(tmp_path / name) == rows


def test_unreadable_files_get_a_clear_error(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a"}\n{not json\n')
    with pytest.raises(DataFormatError, match=r"broken.jsonl:2: not JSON"):
        read_rows(tmp_path / "broken.jsonl")
    (tmp_path / "object.json").write_text('{"instruction": "a"}')
    with pytest.raises(DataFormatError, match="expected a JSON array"):
        read_rows(tmp_path / "object.json")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        read_rows(tmp_path / "rows.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="not a readable parquet"):
        read_rows(tmp_path / "bad.parquet")


def test_prompt_key_ignores_case_width_and_spacing():
    a = {"instruction": "What is  the symbol of Sodium?", "input": ""}
    b = {"instruction": "what is the symbol of sodium?\n", "input": " "}
    c = {"instruction": "ｗhat is the symbol of sodium?", "input": ""}  # full-width w
    assert prompt_key(a) == prompt_key(b) == prompt_key(c)
    assert prompt_key(a) != prompt_key({"instruction": a["instruction"], "input": "context"})


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_latin1_byte_is_named_with_the_fix(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes('[{"instruction": "Caf\xe9?", "input": "", "output": "yes"}]'.encode("latin-1"))
    with pytest.raises(DataFormatError) as error:
        read_rows(path)
    message = str(error.value)
    assert str(path) in message and "UTF-8" in message and "0xe9" in message and "iconv" in message
