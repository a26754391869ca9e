import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from alpaca_qlora import io


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outs_get_the_modes_a_plain_write_would(tmp_path, umask_022):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    plain_dir = tmp_path / "plain_dir"
    plain_dir.mkdir()

    io.write_json(tmp_path / "metrics" / "out.json", {"a": 1})
    io.write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
    with io.atomic_dir(tmp_path / "adapter") as scratch:
        save_file({"w": torch.zeros(2)}, scratch / "adapter_model.safetensors")  # safetensors writes 0600 itself
        (scratch / "tokenizer").mkdir()
        (scratch / "tokenizer" / "vocab.json").write_text("{}")

    assert mode(tmp_path / "metrics" / "out.json") == mode(plain) == 0o644
    assert mode(tmp_path / "rows.jsonl") == 0o644
    assert mode(tmp_path / "adapter") == mode(plain_dir) == 0o755
    assert mode(tmp_path / "adapter" / "adapter_model.safetensors") == 0o644
    assert mode(tmp_path / "adapter" / "tokenizer") == 0o755
    assert mode(tmp_path / "adapter" / "tokenizer" / "vocab.json") == 0o644


def test_a_stricter_umask_is_kept(tmp_path):
    previous = os.umask(0o077)
    try:
        io.write_text(tmp_path / "private.txt", "secret")
        with io.atomic_dir(tmp_path / "private_dir"):
            pass
    finally:
        os.umask(previous)
    assert mode(tmp_path / "private.txt") == 0o600
    assert mode(tmp_path / "private_dir") == 0o700


def test_an_interrupted_write_leaves_the_old_out_and_no_scratch(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"old": True})
    with pytest.raises(RuntimeError), io.atomic_path(target) as scratch:
        scratch.write_text("half")
        raise RuntimeError("killed")
    assert io.read_json(target) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
