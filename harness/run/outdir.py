"""The output folder of a run: checked writable before anything is measured, and locked against a second run.

The lock is `<out>/.lock` (flock, `.lock.rank<R>` for other torchrun ranks): a second run on the same folder is
refused with the pid of the one holding it, and the lock dies with its process, so a killed run leaves none.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["OutputFolderError", "prepare_out", "lock_out"]


class OutputFolderError(OSError):
    """The output folder cannot be written, or another run holds it."""


def prepare_out(out: Path) -> None:
    """Creates `out` and writes (then removes) a probe file there, so a read-only or misplaced folder fails
    now and not after the first measurement."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise OutputFolderError(f"output folder {out} is not writable ({err.strerror or err}); "
                                f"give a folder you can write to with --out") from None


def lock_out(out: Path, rank: int = 0) -> int:
    """Takes `<out>/.lock` (`.lock.rank<R>` for other torchrun ranks) without waiting and writes our pid into
    it; returns the descriptor, whose closing (or the process's death) releases the lock."""
    path = out / (".lock" if rank == 0 else f".lock.rank{rank}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputFolderError(f"output folder {out} is in use by another varbench run (pid {holder}); wait "
                                f"for it to finish or give another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
