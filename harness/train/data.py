"""Where `harness.train`'s samples come from: the synthetic set in memory, or an ImageNet-style folder on disk.

Both sources hand the loop this rank's share of each step's global batch (every world-th sample), determined by
(seed, step, rank) alone, so a resumed run reads exactly what an uninterrupted one would.

* `MemoryData`: tensors in memory (the synthetic images, or their token pyramids); the trainer gives the rows
  of each step (`harness.train_tasks`: uniform draws with replacement from a (seed, step) generator).
* `FolderData`: `PATH/train/<class>/*.{png,jpg,jpeg,webp}` (and optionally `PATH/val/<class>/...`, the
  held-out split) streamed through a DataLoader. Class index = position of the directory name in sorted order,
  as torchvision's ImageFolder does, so ImageNet's synset folders get the standard labels 0..999. Steps walk the
  training set in epochs without replacement: epoch e is a permutation seeded by (seed, e).

The image transform is VAR's (`var_transform`). docs/VAR_SPEC.md does not describe VAR's data pipeline at all, so
none of it is confirmed by the spec; the numbers below were read from the official utils/data.py
(FoundationVision/VAR@e292a77) and utils/arg_util.py (@64d3aee), not from a run, so they are unverified: resize
the shorter side to round(mid_reso·size) with LANCZOS, mid_reso 1.125; then a random size×size crop for
training, a center crop for the held-out split; horizontal flip off by default (`hflip=False`), so none here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["IMAGE_SUFFIXES", "MID_RESO", "LAYOUT", "FolderIndex", "scan_folder", "var_transform", "crop_rng",
           "ImageFolderSet", "epoch_indices", "MemoryData", "FolderData"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # compared lower-case: .JPEG (ImageNet) is included
MID_RESO = 1.125  # VAR's mid_reso: resize to 1.125·size, then crop (unverified, see the module docstring)
LAYOUT = "PATH/train/<class_dir>/*.{png,jpg,jpeg,webp}, optionally PATH/val/<class_dir>/... for the held-out split"


# -- the folder ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FolderIndex:
    """The files of an ImageNet-style folder. Paths are kept as one numpy bytes array relative to `root`:
    DataLoader workers fork the process, and a list of 1.28 M Python strings would be copied page by page as
    their reference counts change."""

    root: Path
    classes: tuple[str, ...]
    train_files: np.ndarray  # bytes, relative to root
    train_labels: np.ndarray  # int64
    val_files: np.ndarray | None  # None: the folder has no val/
    val_labels: np.ndarray | None


def _image_files(class_dir: Path) -> list[str]:
    """Image files under one class directory (recursive, symlinks followed, as ImageFolder), sorted."""
    found = []
    for dirpath, _, names in os.walk(class_dir, followlinks=True):
        found += [os.path.join(dirpath, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _split(root: Path, split: str, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    split_dir = root / split
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{split_dir} has class directories that train/ lacks: {unknown[:5]}; expected {LAYOUT}")
    if not names:
        raise ValueError(f"{split_dir} has no class directories (a flat folder of images, like ImageNet's raw val "
                         f"set, must be sorted into one directory per class); expected {LAYOUT}")
    label_of = {c: i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for name in names:
        found = _image_files(split_dir / name)
        if not found:
            raise ValueError(f"{split_dir / name} holds no images ({', '.join(IMAGE_SUFFIXES)}); expected {LAYOUT}")
        files += [os.path.relpath(f, root) for f in found]
        labels += [label_of[name]] * len(found)
    return np.array([f.encode() for f in files]), np.array(labels, dtype=np.int64)


def scan_folder(path: str | os.PathLike[str]) -> FolderIndex:
    """Lists an ImageNet-style folder; ValueError naming what is missing when it does not have that layout."""
    root = Path(path)
    if not (root / "train").is_dir():
        raise ValueError(f"{root} has no train/ directory; expected {LAYOUT}")
    classes = tuple(sorted(e.name for e in os.scandir(root / "train") if e.is_dir()))
    train_files, train_labels = _split(root, "train", classes)
    val_files = val_labels = None
    if (root / "val").is_dir():
        val_files, val_labels = _split(root, "val", classes)
    return FolderIndex(root, classes, train_files, train_labels, val_files, val_labels)


# -- the transform ---------------------------------------------------------------------------------------------

def crop_rng(seed: int, step: int, slot: int) -> np.random.Generator:
    """The random crop's own stream for sample `slot` of step `step`'s global batch (never the global RNG)."""
    return np.random.default_rng((seed & (2**64 - 1), step, slot))


def var_transform(img: Image.Image, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """VAR's training transform of one image to uint8 (size, size, 3); `rng` None = the center crop (held out).

    Shorter side to round(MID_RESO·size) with LANCZOS, the longer side scaled and truncated to an int (what
    torchvision's Resize(int) does), then a size×size crop. Unverified against the spec (module docstring).
    """
    img = img.convert("RGB")
    mid = round(MID_RESO * size)
    w, h = img.size
    new_w, new_h = (mid, int(mid * h / w)) if w <= h else (int(mid * w / h), mid)
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if rng is None:  # torchvision's CenterCrop offsets
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    else:
        top, left = int(rng.integers(0, new_h - size + 1)), int(rng.integers(0, new_w - size + 1))
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)  # a writable copy


class ImageFolderSet(Dataset):
    """Loads and transforms one image per key (index, step, slot); step and slot seed the random crop."""

    def __init__(self, root: Path, files: np.ndarray, labels: np.ndarray, size: int, seed: int, train: bool):
        self.root, self.files, self.labels = root, files, labels
        self.size, self.seed, self.train = size, seed, train

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[Tensor, int]:
        index, step, slot = key
        with Image.open(self.root / self.files[index].decode()) as img:
            rng = crop_rng(self.seed, step, slot) if self.train else None
            pixels = var_transform(img, self.size, rng)
        return torch.from_numpy(pixels), int(self.labels[index])


# -- sources -----------------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)  # a step's batch spans at most a couple of epochs; recomputing a permutation is the cost
def _epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) & (2**63 - 1)))


def epoch_indices(seed: int, step: int, batch_size: int, n: int) -> Tensor:
    """Global batch of step `step`: positions step·B .. step·B + B − 1 of the sequence of epochs, each epoch a
    permutation of the n training images seeded by (seed, epoch)."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in (pos // n).unique().tolist():
        here = pos // n == epoch
        out[here] = _epoch_order(seed, epoch, n)[pos[here] % n]
    return out


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]


@dataclass
class MemoryData:
    """Samples and labels in memory; `indices(step)` is the step's global batch (rows of `x`)."""

    x: Tensor
    labels: Tensor
    held_x: Tensor
    held_labels: Tensor
    indices: Callable[[int], Tensor]
    rank: int = 0
    world: int = 1

    @property
    def held_count(self) -> int:
        return len(self.held_labels)

    def batches(self, start: int, end: int) -> Iterator[tuple[Tensor, Tensor]]:
        for step in range(start, end):
            idx = self.indices(step)
            yield self.x[idx][self.rank::self.world], self.labels[idx][self.rank::self.world]

    def heldout(self, size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for sl in _chunks(self.held_count, size):
            yield self.held_x[sl], self.held_labels[sl]


class _StepKeys:
    """DataLoader batch sampler: for each step, this rank's keys (index, step, slot) of the global batch."""

    def __init__(self, indices: Callable[[int], Tensor], start: int, end: int, rank: int, world: int):
        self.indices, self.start, self.end, self.rank, self.world = indices, start, end, rank, world

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start, self.end):
            idx = self.indices(step).tolist()
            yield [(idx[slot], step, slot) for slot in range(self.rank, len(idx), self.world)]


class FolderData:
    """An ImageNet-style folder streamed from disk through a DataLoader with `workers` processes."""

    def __init__(self, index: FolderIndex, size: int, seed: int, batch_size: int, workers: int = 0,
                 rank: int = 0, world: int = 1, pin_memory: bool = False):
        self.index, self.seed, self.batch_size = index, seed, batch_size
        self.workers, self.rank, self.world, self.pin_memory = workers, rank, world, pin_memory
        self.train_set = ImageFolderSet(index.root, index.train_files, index.train_labels, size, seed, True)
        self.val_set = None if index.val_files is None else \
            ImageFolderSet(index.root, index.val_files, index.val_labels, size, seed, False)

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    @property
    def held_count(self) -> int:
        return 0 if self.val_set is None else len(self.val_set)

    def indices(self, step: int) -> Tensor:
        return epoch_indices(self.seed, step, self.batch_size, self.num_train)

    def _loader(self, dataset: Dataset, keys: Any) -> DataLoader:
        return DataLoader(dataset, batch_sampler=keys, num_workers=self.workers, pin_memory=self.pin_memory)

    def batches(self, start: int, end: int) -> Iterator[tuple[Tensor, Tensor]]:
        keys = _StepKeys(self.indices, start, end, self.rank, self.world)
        for images, labels in self._loader(self.train_set, keys):
            yield images, labels

    def heldout(self, size: int) -> Iterator[tuple[Tensor, Tensor]]:
        if self.val_set is None:
            return
        keys = [[(i, 0, 0) for i in range(sl.start, sl.stop)] for sl in _chunks(self.held_count, size)]
        for images, labels in self._loader(self.val_set, keys):
            yield images, labels

    def info(self, steps: int) -> dict[str, Any]:
        root = self.index.root
        held = f"val/ ({self.held_count} images)" if self.val_set is not None else \
            f"none: {root / 'val'} does not exist, so no held-out metrics"
        return {"data": str(root), "data_classes": len(self.index.classes), "data_train_images": self.num_train,
                "heldout_split": held, "epochs": steps * self.batch_size / self.num_train}
