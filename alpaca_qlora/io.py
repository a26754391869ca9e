"""File I/O at the pipeline's edges.

Every out is written to a temporary file beside its destination and renamed into place, so an interrupted stage
never leaves half a file that DVC (or the next stage) would take for a finished one. Inside `outs_group` (the stage
runner opens one around each stage) the renames of the stage's declared outs wait until the stage has succeeded,
then happen together: a stage that fails, fills the disk or is interrupted leaves every out as it was.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


def _scratch_beside(target: Path, create: Callable[[Path], None]) -> Path:
    """A new, uniquely named scratch path beside `target`, created with the umask's modes as a plain write would.

    tempfile.mkstemp/mkdtemp create owner-only (0600/0700) entries, which the rename would carry into the outs.
    """
    for _ in range(100):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a scratch file beside {target}")


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (setting it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _open_to_umask(tree: Path) -> None:
    """Give what a library wrote owner-only (safetensors writes 0600) the permissions the umask allows a plain write.

    Bits are only added, never removed, so executables stay executable.
    """
    allowed = 0o777 & ~current_umask()
    for root, dirs, files in os.walk(tree):
        for name, default in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files] + [("", 0o777)]:
            entry = Path(root, name)
            if entry.is_symlink():
                continue
            current = entry.stat().st_mode & 0o7777
            wanted = current | (default & allowed)
            if wanted != current:
                entry.chmod(wanted)


class OutsGroup:
    """A stage's declared outs, staged beside their targets and moved into place together once the stage succeeded.

    DVC keeps `persist: true` outs while their stage runs, so until commit() the previous outs stay whole and match
    dvc.lock; only the renames, which need no disk space, are left for the end.
    """

    def __init__(self, outs: Iterable[str | os.PathLike[str]]):
        self.outs = tuple(Path(os.path.abspath(out)) for out in outs)
        self.staged: list[tuple[Path, Path]] = []  # (scratch, target), in the order they were written
        self.committed = False

    def covers(self, target: Path) -> bool:
        """Whether `target` is a declared out or lies inside one (a checkpoint, say, is not and is written at once)."""
        target = Path(os.path.abspath(target))
        return any(target == out or out in target.parents for out in self.outs)

    def commit(self) -> None:
        """Check that every target can take its scratch, then move them all in, two-phase: the old outs are set
        aside first and put back if any move fails, so the outs are all new or all old. SIGINT and SIGTERM wait."""
        latest: dict[Path, Path] = {}
        for scratch, target in self.staged:  # a target written twice: its last write counts
            if target in latest:
                _remove(latest[target])
            latest[target] = scratch
        for target, scratch in latest.items():
            _check_replaceable(scratch, target)
        with _signals_deferred():
            aside = _replace_all(latest)
            self.committed = True
            _remove_all(aside)

    def discard(self) -> None:
        for scratch, _ in self.staged:
            _remove(scratch)


_group: OutsGroup | None = None


@contextlib.contextmanager
def outs_group(outs: Iterable[str | os.PathLike[str]]) -> Iterator[OutsGroup]:
    """Within the block, writes to `outs` are staged; they replace the outs together only if the block finishes."""
    global _group
    group = OutsGroup(outs)
    _group = group
    try:
        yield group
        group.commit()
    finally:
        _group = None
        group.discard()


def _check_replaceable(scratch: Path, target: Path) -> None:
    """Refuse before any rename, so one misplaced entry cannot leave a stage's outs half replaced."""
    if scratch.is_dir() and target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target))
    if not scratch.is_dir() and target.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))


def _move_into_place(scratch: Path, target: Path) -> None:
    _remove_all(_replace_all({target: scratch}))


def _replace_all(moves: dict[Path, Path]) -> list[Path]:
    """Move each scratch onto its target, the old target set aside beside it; on any failure put every old target
    back and re-raise. Returns the set-aside old targets, for the caller to remove."""
    aside: dict[Path, Path] = {}
    placed: list[Path] = []
    try:
        for target, scratch in moves.items():
            if target.exists() or target.is_symlink():
                old = target.with_name(f".{target.name}.old")
                _remove(old)
                os.replace(target, old)
                aside[target] = old
            os.replace(scratch, target)
            placed.append(target)
    except BaseException:
        for target in reversed(placed):
            _remove(target)
        for target, old in aside.items():
            os.replace(old, target)
        raise
    return list(aside.values())


def _remove_all(paths: Iterable[Path]) -> None:
    for path in paths:
        _remove(path)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM only noted while the block runs, then raised: a handler, unlike a blocked mask, holds in
    every thread of the process, since Python runs handlers in the main thread alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {number: signal.signal(number, lambda caught, _frame: received.append(caught))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _place(scratch: Path, target: Path) -> None:
    """Move a finished scratch onto its target now, or at the end of the stage when it is one of the stage's outs."""
    if _group is not None and _group.covers(target):
        _group.staged.append((scratch, target))
    else:
        _check_replaceable(scratch, target)
        _move_into_place(scratch, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` only if the block finishes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch_beside(target, lambda name: os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)))
    with _removed_on_failure(tmp, target):
        yield tmp
        _place(tmp, target)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; swap it in for `path` only if the block finishes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch_beside(target, lambda name: os.mkdir(name, 0o777))
    with _removed_on_failure(tmp, target):
        yield tmp
        _open_to_umask(tmp)
        _place(tmp, target)


@contextlib.contextmanager
def _removed_on_failure(scratch: Path, target: Path) -> Iterator[None]:
    """The scratch copy goes if the block fails; an OSError names the out where it names no file."""
    try:
        yield
    except OSError as error:
        _remove(scratch)
        raise _naming(error, target) from None
    except BaseException:
        _remove(scratch)
        raise


def _naming(error: OSError, target: Path) -> OSError:
    """The error with the out's path where it names none (a full disk fails a write(), which names no file), so
    the one line the user sees says which out could not be written."""
    if error.filename is not None or error.errno is None:
        return error
    named = OSError(error.errno, error.strerror, str(target))
    named.__traceback__ = error.__traceback__
    return named


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON with sorted keys and a trailing newline, so equal data gives byte-equal files."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line (keys sorted); return the number of rows written."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}).") from error
    return rows


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
