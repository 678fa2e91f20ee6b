"""Measurement records: one JSON object per line, schema-versioned, each with its provenance.

Appends write a whole line on an O_APPEND descriptor (a short write is continued, a write that makes no
progress raises OSError naming the file) followed by fsync; a study holds a lock on its folder, so no other
writer interleaves. A line cut short by a crash is skipped on load (and its cell is redone on resume); a line
that is JSON but not an object is skipped with a warning naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from .hashing import config_hash

__all__ = ["SCHEMA", "capture_env", "config_hash", "append_record", "load_records"]

log = logging.getLogger(__name__)
SCHEMA = 1
_PACKAGES = ("varbench", "torch", "torchvision", "torch-fidelity", "numpy", "scipy", "pandas")


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def capture_env(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where and with what a number was measured: code version, packages, device, numerics settings."""
    device = torch.device(device)
    env: dict[str, Any] = {"git_sha": _git("rev-parse", "--short=12", "HEAD")}
    env["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no")) if env["git_sha"] else None
    for pkg in _PACKAGES:
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    env.update(python=platform.python_version(), host=socket.gethostname(), platform=platform.platform(),
               cpu_threads=torch.get_num_threads(), cuda=torch.version.cuda,
               tf32=torch.backends.cuda.matmul.allow_tf32, device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_memory_bytes=props.total_memory,
                   cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver())
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Appends one record as one line, atomically with respect to other appends and crashes."""
    line = (json.dumps({"schema": SCHEMA, **record}, default=str) + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a crash cut the last line short: keep ours whole on a line of its own
        _write_all(fd, line, path)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, path: Path) -> None:
    """Writes every byte of `data`: os.write may write fewer (a full disk, a signal); 0 bytes is no progress."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"could not append a record to {path}: wrote {len(data) - len(view)} of {len(data)} "
                          f"bytes (disk full?); the record is incomplete and will be redone on resume")
        view = view[written:]


def load_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file or of every *.jsonl below a folder; a truncated line is skipped."""
    path = Path(path)
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # an interrupted append
            if not isinstance(record, dict):
                log.warning("%s line %d: skipped, a record is a JSON object, not %s", file, number,
                            type(record).__name__)
                continue
            yield record
