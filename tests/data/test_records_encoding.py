"""A local data file that is not UTF-8 is refused with a message naming the file, the byte and the fix."""
from __future__ import annotations

import pytest

from alpaca_qlora.data.records import DataFormatError, read_rows


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_latin1_byte_is_named_with_the_fix(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes('[{"instruction": "Caf\xe9?", "input": "", "output": "yes"}]'.encode("latin-1"))
    with pytest.raises(DataFormatError) as error:
        read_rows(path)
    message = str(error.value)
    assert str(path) in message and "UTF-8" in message and "0xe9" in message and "iconv" in message
