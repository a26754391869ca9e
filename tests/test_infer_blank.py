"""`python -m alpaca_qlora.infer` refuses a blank instruction before loading any model."""
from __future__ import annotations

import pytest

from alpaca_qlora import infer


@pytest.mark.parametrize("instruction", ["   ", "\t\n"])
def test_a_blank_instruction_is_refused_before_loading(monkeypatch, capsys, instruction):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded for a blank instruction")

    monkeypatch.setattr(infer, "load_for_inference", no_load)
    with pytest.raises(SystemExit) as exit_info:
        infer.main([instruction])
    assert exit_info.value.code == 2
    assert "instruction" in capsys.readouterr().err
