"""Finding and reading checkpoint files, with errors that say what is wrong and where to get the file.

A source is a local path, or `hf:OWNER/REPO/FILE` for a file of a Hugging Face repo. Hugging Face files are
read from the local cache (HF_HOME / HF_HUB_CACHE); they are downloaded only when downloads are allowed
(`allow_download=True`, `--download` on the command line, or VARBENCH_DOWNLOAD=1), so a benchmark never
fetches hundreds of MB behind the user's back. Every file is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "OFFICIAL_FILES", "resolve_source", "read_state_dict", "load_strict"]

# Released weights: name -> Hugging Face "owner/repo/file".
OFFICIAL_FILES: dict[str, str] = {
    "var_d16": "FoundationVision/var/var_d16.pth",
    "var_d20": "FoundationVision/var/var_d20.pth",
    "var_d24": "FoundationVision/var/var_d24.pth",
    "var_d30": "FoundationVision/var/var_d30.pth",
    "var_d36": "FoundationVision/var/var_d36.pth",
    "vae": "FoundationVision/var/vae_ch160v4096z32.pth",
}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


def _downloads_allowed(allow_download: bool | None) -> bool:
    if allow_download is not None:
        return allow_download
    return os.environ.get("VARBENCH_DOWNLOAD", "") not in ("", "0")


def resolve_source(source: str | os.PathLike, allow_download: bool | None = None) -> Path:
    """Local file path of a checkpoint source (a path, `hf:OWNER/REPO/FILE`, or a name in OFFICIAL_FILES)."""
    text = str(source)
    if text in OFFICIAL_FILES:
        text = "hf:" + OFFICIAL_FILES[text]
    if not text.startswith("hf:"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        return path
    parts = text[3:].lstrip("/").split("/")
    if len(parts) < 3:
        raise CheckpointError(f"bad Hugging Face source {text!r}: expected hf:OWNER/REPO/FILE")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except LocalEntryNotFoundError:
        if not _downloads_allowed(allow_download):
            raise CheckpointError(
                f"{filename} is not in the local Hugging Face cache and downloads are off. Download it from "
                f"{url} and pass its path, or allow downloads (--download / VARBENCH_DOWNLOAD=1).") from None
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:  # network, auth, missing file: all end the same way for the user
        raise CheckpointError(f"could not download {url}: {err}. Download it by hand and pass its path.") from err


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Reads a state dict of tensors (safely: weights_only=True); unwraps {'model': ...}/{'state_dict': ...}."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(_unreadable(path, err)) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and set(obj) == {wrapper}:
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return dict(obj)


def _unreadable(path: Path, err: BaseException) -> str:
    """Why torch.load refused a file, in the reader's terms; never advice to turn weights-only loading off."""
    text = str(err)
    blocked = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), None)
    if blocked:
        return (f"{path} holds Python objects besides tensors ({blocked}): loading it could run code, so "
                f"varbench refuses it. Use a checkpoint that holds only a state dict of tensors.")
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK" or head.startswith(b"\x80"):  # a zip archive (torch.save) or a legacy pickle, cut or damaged
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        return f"{path} is a damaged PyTorch checkpoint (truncated or corrupt: download it again): {first[:160]}"
    return (f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle, {path.stat().st_size} "
            f"bytes): another format, or a corrupt download")


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def load_strict(module: nn.Module, sd: Mapping[str, Tensor], origin: str, kind: str) -> None:
    """Loads `sd` into `module` strictly, or raises CheckpointError listing missing and unexpected keys and
    shape differences. `origin` names the file, `kind` the model (e.g. "VAR-d16")."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        lines = [f"{origin} does not fit {kind}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_describe(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
        if shapes:
            lines.append(f"  shape differences ({len(shapes)}): {_describe(shapes, 4)}")
        raise CheckpointError("\n".join(lines))
    on_meta = any(t.is_meta for t in module.state_dict().values())
    module.load_state_dict(dict(sd), strict=True, assign=on_meta)
