"""The project's one content hash: sha256 of a file's bytes (weights, fixtures, zoo files, caches), and the
short digest of a JSON-able config (records' `config_hash`)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

__all__ = ["file_sha256", "text_sha256", "config_hash"]


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) so a 96 MB weights file is read once."""
    st = os.stat(path)
    return _sha256_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_hash(config: Any) -> str:
    """Stable short hash of a JSON-serialisable configuration."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return text_sha256(text)[:12]
