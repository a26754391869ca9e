import errno
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


def _two_outs(tmp_path):
    outs = [tmp_path / "a.json", tmp_path / "dir"]
    io.write_json(outs[0], {"old": True})
    (outs[1]).mkdir()
    (outs[1] / "f.txt").write_text("old")
    return outs


def _write_new(outs):
    io.write_json(outs[0], {"new": True})
    with io.atomic_dir(outs[1]) as scratch:
        (scratch / "f.txt").write_text("new")


def test_a_move_that_fails_midway_puts_every_old_out_back(tmp_path, monkeypatch):
    outs = _two_outs(tmp_path)
    real_replace, moves, failed = os.replace, [], []

    def failing_second_move(source, target):  # the new folder's move in fails, once
        moves.append(target)
        if os.path.abspath(target) == str(outs[1]) and ".old" not in str(source) and not failed:
            failed.append(target)
            raise OSError(13, "Permission denied", str(target))
        real_replace(source, target)

    with pytest.raises(OSError), io.outs_group(outs):
        _write_new(outs)
        monkeypatch.setattr(os, "replace", failing_second_move)
    monkeypatch.undo()
    assert io.read_json(outs[0]) == {"old": True}  # the first out was moved in, then put back
    assert (outs[1] / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "dir"]


def test_a_signal_during_the_moves_waits_until_every_out_is_new(tmp_path, monkeypatch):
    import signal

    outs = _two_outs(tmp_path)
    real_replace = os.replace
    signalled = []

    def replace_then_signal(source, target):
        real_replace(source, target)
        if not signalled:
            signalled.append(target)
            signal.raise_signal(signal.SIGTERM)

    class Terminated(Exception):
        pass

    def terminate(*_):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.raises(Terminated), io.outs_group(outs):
            _write_new(outs)
            monkeypatch.setattr(os, "replace", replace_then_signal)
    finally:
        signal.signal(signal.SIGTERM, previous)
        monkeypatch.undo()
    assert signalled
    assert io.read_json(outs[0]) == {"new": True}
    assert (outs[1] / "f.txt").read_text() == "new"


def test_a_full_disk_names_the_out_it_could_not_write_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_text("old\n")

    def rows():
        yield {"a": 1}
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() reports it: no file name

    with pytest.raises(OSError) as raised:
        io.write_jsonl(out, rows())
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out)
    assert out.read_text() == "old\n" and sorted(tmp_path.iterdir()) == [out]
