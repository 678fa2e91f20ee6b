"""Prompt sets for text-to-image evaluation: named sets in a registry, each read from a file given by path.

Formats (`read_prompt_file` picks by suffix):
- .txt   one prompt per line; blank lines and lines starting with `#` are skipped.
- .jsonl one JSON object per line with a "prompt" key (GenEval's prompts/evaluation_metadata.jsonl); the other
         keys (GenEval's "tag", "include", "exclude", ...) are kept per prompt in `metadata`.
- .json  either COCO captions ({"annotations": [{"image_id", "caption"}], "images": [{"id", "file_name"}]}):
         one caption per image, the FIRST caption of that image in annotation order, images in the order of
         "images" (images without a caption are dropped); or MJHQ-30K's meta_data.json
         ({image_id: {"category", "prompt"}}), whose reference image is `<category>/<image_id>.jpg`, the layout of
         the data set's mjhq30k_imgs.zip (unverified: check it against your copy, or pass image_root=None).
- .csv   a `prompt` or `caption` column, an optional `image` or `file_name` column (the reference image), the
         other columns kept in `metadata`.
Reference image paths are joined to `image_root` when one is given, else kept as written in the file.

Named sets (`PROMPT_SETS`, `load_prompt_set(name, path=None)`) are never shipped or downloaded: a set is read from
`path`, else from $VARBENCH_PROMPTS_<NAME>; a folder is searched for the set's expected file name. Without either,
the error names the set, the file and where to get it. `synthetic_captions` is built in (no file): captions of
the project's procedural data set's classes (harness/eval/synthetic.py), for tests and the CPU default.

COCO-30k: `coco30k` reads captions_val2014.json (40,504 images, one caption each by the rule above) and keeps
`subset(30000, seed=0)`. Papers draw their 30k captions at random without publishing the seed or index list,
so our 30k are a reproducible draw of the same kind, not the papers' exact list.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from varbench.harness.core.registry import Registry
from varbench.harness.eval.synthetic import CLASSES

__all__ = [
    "COCO30K_SIZE",
    "PROMPT_SETS",
    "SOURCES",
    "PromptSet",
    "PromptSource",
    "load_prompt_set",
    "read_csv",
    "read_json",
    "read_jsonl",
    "read_prompt_file",
    "read_txt",
    "resolve_prompt_path",
]

COCO30K_SIZE = 30_000


@dataclass(frozen=True)
class PromptSet:
    """Prompts in file order; `images` (reference image path or None per prompt) and `metadata` (one dict per
    prompt) are None when the file has none."""
    name: str
    prompts: list[str]
    images: list[str | None] | None = None
    metadata: list[dict[str, Any]] | None = None
    source: str | None = None  # the file read, or "builtin"

    def __post_init__(self):
        for extra in (self.images, self.metadata):
            if extra is not None and len(extra) != len(self.prompts):
                raise ValueError(f"prompt set {self.name!r}: {len(extra)} entries for {len(self.prompts)} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, indices: list[int] | np.ndarray) -> PromptSet:
        idx = [int(i) for i in indices]
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        return replace(self, prompts=pick(self.prompts), images=pick(self.images), metadata=pick(self.metadata))

    def subset(self, n: int, seed: int = 0) -> PromptSet:
        """n prompts drawn without replacement by `np.random.default_rng(seed).choice(len, n, replace=False)`,
        kept in file order (sorted indices). n >= len returns the whole set. Same (file, n, seed) -> same subset."""
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return replace(self.select(idx), name=f"{self.name}[{n},seed={seed}]")


def _join(root: str | os.PathLike | None, image: str | None) -> str | None:
    if image is None or image == "":
        return None
    return str(Path(root) / image) if root is not None else image


def read_txt(path: str | os.PathLike, name: str | None = None) -> PromptSet:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    return PromptSet(name or Path(path).stem, prompts, source=str(path))


def read_jsonl(path: str | os.PathLike, name: str | None = None) -> PromptSet:
    prompts, metadata = [], []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row:
            raise ValueError(f"{path}:{lineno}: no \"prompt\" key (keys: {', '.join(row)})")
        prompts.append(str(row["prompt"]))
        metadata.append({k: v for k, v in row.items() if k != "prompt"})
    return PromptSet(name or Path(path).stem, prompts, metadata=metadata, source=str(path))


def _read_coco(data: dict, path: str, name: str, image_root) -> PromptSet:
    first: dict[Any, str] = {}
    for ann in data["annotations"]:
        first.setdefault(ann["image_id"], ann["caption"].strip())  # the first caption by annotation order
    prompts, images, metadata = [], [], []
    for img in data["images"]:
        if img["id"] in first:
            prompts.append(first[img["id"]])
            images.append(_join(image_root, img["file_name"]))
            metadata.append({"image_id": img["id"]})
    return PromptSet(name, prompts, images, metadata, source=path)


def _read_mjhq(data: dict, path: str, name: str, image_root) -> PromptSet:
    prompts, images, metadata = [], [], []
    for image_id, row in data.items():
        prompts.append(str(row["prompt"]))
        images.append(_join(image_root, f"{row['category']}/{image_id}.jpg"))
        metadata.append({"image_id": image_id, "category": row["category"]})
    return PromptSet(name, prompts, images, metadata, source=path)


def read_json(path: str | os.PathLike, name: str | None = None,
              image_root: str | os.PathLike | None = None) -> PromptSet:
    """COCO captions or MJHQ-30K's meta_data.json (see the module docstring)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    name = name or Path(path).stem
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return _read_coco(data, str(path), name, image_root)
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "prompt" in v and "category" in v
                                               for v in data.values()):
        return _read_mjhq(data, str(path), name, image_root)
    raise ValueError(f"{path}: neither COCO captions ({{'annotations', 'images'}}) nor MJHQ-30K meta_data.json "
                     "({image_id: {'category', 'prompt'}})")


def read_csv(path: str | os.PathLike, name: str | None = None,
             image_root: str | os.PathLike | None = None) -> PromptSet:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
        columns = list(rows[0]) if rows else []
    text_col = next((c for c in ("prompt", "caption") if c in columns), None)
    if text_col is None:
        raise ValueError(f"{path}: needs a 'prompt' or 'caption' column (columns: {', '.join(columns)})")
    image_col = next((c for c in ("image", "file_name") if c in columns), None)
    prompts = [r[text_col].strip() for r in rows]
    images = [_join(image_root, r[image_col]) for r in rows] if image_col else None
    rest = [c for c in columns if c not in (text_col, image_col)]
    metadata = [{c: r[c] for c in rest} for r in rows] if rest else None
    return PromptSet(name or Path(path).stem, prompts, images, metadata, source=str(path))


def read_prompt_file(path: str | os.PathLike, name: str | None = None,
                     image_root: str | os.PathLike | None = None) -> PromptSet:
    """A prompt file of any supported format, chosen by its suffix (.txt, .jsonl, .json, .csv)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return read_txt(path, name)
    if suffix == ".jsonl":
        return read_jsonl(path, name)
    if suffix == ".json":
        return read_json(path, name, image_root)
    if suffix == ".csv":
        return read_csv(path, name, image_root)
    raise ValueError(f"{path}: unknown prompt file type {suffix!r} (use .txt, .jsonl, .json or .csv)")


@dataclass(frozen=True)
class PromptSource:
    """Where a named set's file comes from: its expected file name and a URL a reader can open."""
    filename: str
    url: str
    note: str = ""

    def env(self, name: str) -> str:
        return f"VARBENCH_PROMPTS_{name.upper()}"


SOURCES: dict[str, PromptSource] = {
    "coco30k": PromptSource("captions_val2014.json",
                            "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                            "COCO 2014 captions, file annotations/captions_val2014.json in the zip (cocodataset.org)"),
    "mjhq30k": PromptSource("meta_data.json", "https://huggingface.co/datasets/playgroundai/MJHQ-30K",
                            "MJHQ-30K's meta_data.json on Hugging Face (reference images: mjhq30k_imgs.zip)"),
    "geneval": PromptSource("evaluation_metadata.jsonl",
                            "https://github.com/djghosh13/geneval/blob/main/prompts/evaluation_metadata.jsonl",
                            "GenEval's prompts/evaluation_metadata.jsonl (github.com/djghosh13/geneval)"),
}


def resolve_prompt_path(name: str, path: str | os.PathLike | None = None) -> Path:
    """`path`, else $VARBENCH_PROMPTS_<NAME>; a folder is searched (recursively) for the set's expected file."""
    src = SOURCES[name]
    given = path if path is not None else os.environ.get(src.env(name)) or None
    how = f"get {src.note} from {src.url}"
    if given is None:
        raise FileNotFoundError(f"prompt set {name!r} needs {src.filename}: pass its path (path=...) or set "
                                f"${src.env(name)}; {how}")
    p = Path(given)
    if p.is_dir():
        found = sorted(p.rglob(src.filename))
        if not found:
            raise FileNotFoundError(f"prompt set {name!r}: no {src.filename} under {p}; {how}")
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"prompt set {name!r}: file not found: {p} (expected {src.filename}); {how}")
    return p


PROMPT_SETS: Registry[Callable[..., PromptSet]] = Registry("prompt set", "varbench.prompt_sets")


@PROMPT_SETS.register
def coco30k(path: str | os.PathLike | None = None, image_root: str | os.PathLike | None = None,
            size: int = COCO30K_SIZE, seed: int = 0) -> PromptSet:
    """COCO-30k: one caption per val2014 image, then `subset(size, seed)` (see the module docstring)."""
    full = read_json(resolve_prompt_path("coco30k", path), "coco30k", image_root)
    return replace(full.subset(size, seed), name="coco30k")


@PROMPT_SETS.register
def mjhq30k(path: str | os.PathLike | None = None, image_root: str | os.PathLike | None = None) -> PromptSet:
    """MJHQ-30K: the 30,000 prompts of meta_data.json with their category."""
    return read_json(resolve_prompt_path("mjhq30k", path), "mjhq30k", image_root)


@PROMPT_SETS.register
def geneval(path: str | os.PathLike | None = None) -> PromptSet:
    """GenEval's prompts, each with its tag/include/exclude metadata for the object-detector scoring."""
    return read_jsonl(resolve_prompt_path("geneval", path), "geneval")


# Caption phrases of the synthetic data set's classes, keyed by CLASSES name (colours from synthetic.py).
_CLASS_PHRASES = {
    "red_disc": "a red disc", "blue_square": "a blue square", "green_triangle": "a green triangle",
    "yellow_ring": "a yellow ring", "magenta_cross": "a magenta cross",
    "stripes_horizontal": "horizontal cyan and navy stripes", "stripes_diagonal": "diagonal orange and purple stripes",
    "checkerboard": "a black and white checkerboard", "dots": "cream polka dots on teal",
    "gradient_blobs": "soft colourful blobs on a dark background",
}
_TEMPLATES = ("{}", "a picture of {}, centred")


@PROMPT_SETS.register
def synthetic_captions(path: None = None) -> PromptSet:
    """Two captions per class of the procedural data set (20): metadata holds the class label, so a
    class-conditional model can be driven by the same prompt list."""
    if path is not None:
        raise ValueError("synthetic_captions is built in and takes no path")
    missing = set(CLASSES) - set(_CLASS_PHRASES)
    if missing:  # a class added to synthetic.py needs its phrase here
        raise KeyError(f"no caption phrase for synthetic classes: {', '.join(sorted(missing))}")
    prompts, metadata = [], []
    for template in _TEMPLATES:
        for label, cls in enumerate(CLASSES):
            prompts.append(template.format(_CLASS_PHRASES[cls]))
            metadata.append({"label": label, "class": cls})
    return PromptSet("synthetic_captions", prompts, metadata=metadata, source="builtin")


def load_prompt_set(name: str, path: str | os.PathLike | None = None, **kwargs) -> PromptSet:
    """A named prompt set (coco30k, mjhq30k, geneval, synthetic_captions), read from `path` or its env variable."""
    return PROMPT_SETS.get(name)(path=path, **kwargs)
