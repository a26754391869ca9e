"""Phase marks that a decoding loop leaves for whoever measures it; by default nobody does and they cost nothing.

A loop calls `recorder.begin()` as a batch starts and `recorder.mark(phase)` where a phase ends, and runs its
host-side stop checks inside `recorder.host_work()`. A bench passes a recorder that times them (synchronizing the
device where it must), so the loops carry no measuring code of their own, as torchtune's training loop runs under a
profiler whose default is a no-op.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Recorder:
    """The no-op default: subclass it and override what you measure."""

    def begin(self) -> None:
        """A batch's decoding starts: what came before belongs to no phase."""

    def mark(self, phase: str) -> None:
        """The phase `phase` ends here: the time since the previous mark belongs to it."""

    @contextlib.contextmanager
    def host_work(self) -> Iterator[None]:
        """Host-side work (stop checks) that overlaps the device's decoding on CUDA."""
        yield


NO_RECORDING = Recorder()
