"""Measurement records: one JSON object per line, schema-versioned, each with its provenance.

Appends write a whole line on an O_APPEND descriptor (a short write is continued, a write that makes no
progress raises OSError naming the file) followed by fsync; a study holds a lock on its folder, so no other
writer interleaves. A line cut short by a crash is skipped on load (and its cell is redone on resume); a line
that is JSON but not an object is skipped with a warning naming the file and line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
from collections.abc import Iterator
from importlib.metadata import Distribution, PackageNotFoundError, distributions, version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import tomllib
import torch

from .hashing import config_hash

__all__ = ["SCHEMA", "capture_env", "code_version", "config_hash", "append_record", "load_records"]

log = logging.getLogger(__name__)
SCHEMA = 1
_PACKAGES = ("varbench", "torch", "torchvision", "torch-fidelity", "numpy", "scipy", "pandas")


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _clone_state(folder: Path) -> dict[str, Any] | None:
    """The clone holding `folder`: its HEAD (12 hex digits), whether tracked files differ, its top folder.

    Changes under `results/` do not count: regenerating a committed result rewrites it while the code that
    measures it is the commit's."""
    sha = _git(folder, "rev-parse", "--short=12", "HEAD")
    if not sha:
        return None
    dirty = bool(_git(folder, "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)results"))
    return {"git_sha": sha, "git_dirty": dirty, "git_source": _git(folder, "rev-parse", "--show-toplevel")}


def _record_hash(data: bytes) -> str:
    """A file's hash as a wheel's RECORD writes it: urlsafe base64 of its sha256, unpadded."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _differing_files(dist: Distribution, source: Path) -> list[str] | None:
    """Installed .py files of `dist` whose sha256 (from its RECORD) differs from the same file in the source
    folder, mapped through the source's [tool.setuptools.package-dir]; None when that cannot be told."""
    try:
        mapping = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    prefixes = sorted(((pkg.replace(".", "/") + "/", folder) for pkg, folder in mapping.items()),
                      key=lambda item: -len(item[0]))
    differing = []
    for file in dist.files or ():
        path = file.as_posix()
        prefix = next(((p, f) for p, f in prefixes if path.startswith(p)), None)
        if not path.endswith(".py") or prefix is None or file.hash is None:
            continue
        mirror = source / prefix[1] / path[len(prefix[0]):]
        if not mirror.is_file() or _record_hash(mirror.read_bytes()) != file.hash.value:
            differing.append(path)
    return differing


def _installed() -> Distribution | None:
    """pip's record of the installed varbench: the one with a direct_url.json (a source tree's own *.egg-info,
    found first when the working directory is the clone, is not an install), else any with a RECORD."""
    found = [d for d in distributions(name="varbench") if d.read_text("RECORD") or d.read_text("direct_url.json")]
    return next((d for d in found if d.read_text("direct_url.json")), found[0] if found else None)


def code_version(package_dir: Path | None = None, dist: Distribution | None | str = "find") -> dict[str, Any]:
    """Which code measured: the installed version, and the git commit it came from wherever that can be found.

    Looked up from this package's own location, never the working directory: a source checkout or an editable
    install sits inside its clone. A copy installed by pip names its source in direct_url.json (PEP 610): a VCS
    URL with its commit, or a local folder, whose HEAD is taken when the copy's files still match it (else the
    copy is marked dirty: it was built from another state). When no commit can be found, `git_note` says why.
    `package_dir` and `dist` (default: this package's folder and its installed distribution) are for tests.
    """
    info: dict[str, Any] = {"git_sha": None, "git_dirty": None, "git_source": None, "git_note": None}
    dist = _installed() if isinstance(dist, str) else dist
    direct = json.loads(dist.read_text("direct_url.json") or "null") or {} if dist else {}
    editable = bool(direct.get("dir_info", {}).get("editable"))
    info["install"] = "not installed" if dist is None else ("editable" if editable else "copy")
    clone = _clone_state(package_dir or Path(__file__).resolve().parent)
    if clone:
        return info | clone
    if "vcs_info" in direct:
        vcs = direct["vcs_info"]
        return info | {"git_sha": vcs.get("commit_id", "")[:12] or None, "git_dirty": False,
                       "git_source": f"{direct.get('url')}@{vcs.get('requested_revision') or 'default'}",
                       "git_note": "installed by pip from a VCS URL at this commit"}
    url = direct.get("url", "")
    if not url.startswith("file://") or dist is None:
        reason = ("not installed and not inside a git clone" if dist is None else
                  "installed from a wheel or an index, not from a clone: `varbench` names the version")
        return info | {"git_note": reason}
    source = Path(url2pathname(urlparse(url).path))
    clone = _clone_state(source) if source.is_dir() else None
    if not clone:
        return info | {"git_source": str(source),
                       "git_note": f"installed from {source}, which is not (or no longer) a git clone"}
    differing = _differing_files(dist, source)
    if differing is None:
        note = f"installed copy of {source}: its files could not be compared, so HEAD may not be what runs"
        return info | clone | {"git_dirty": True, "git_note": note}
    if differing:
        note = (f"installed copy differs from its source in {len(differing)} file(s) (e.g. {differing[0]}): built "
                f"from another state than HEAD; reinstall, or install with `pip install -e`")
        return info | clone | {"git_dirty": True, "git_note": note}
    return info | clone | {"git_note": f"installed copy of {source}; its files match the clone"}


def capture_env(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where and with what a number was measured: code version, packages, device, numerics settings."""
    device = torch.device(device)
    env: dict[str, Any] = code_version()
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
