"""A study's reference set: where it comes from ("synthetic" or a file), where its statistics are cached, and
its resolution, read from headers and checked against the samples' before anything is scored.

`heldout_real` gives the real-data row of a quality table: real images the reference does not hold, as many as
a cell's samples, scored against the reference exactly like a cell, so a reader sees what "as good as data"
reads as (the finite-sample floor of FID/KID at that n, and precision/recall of data itself):
  synthetic   images [count, count + n) of the reference's own seed, where the reference holds [0, count);
  images      (a folder, or an .npz of arr_0 images whose FID statistics come from them) with at least 2n
              images: the last n (in the loader's order) against a reference of the others (features reused);
  otherwise   absent, with the reason (statistics only; statistics over every image; too few images).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["SYNTHETIC_SEED", "cache_dir", "reference_source", "study_reference", "reference_resolution",
           "check_resolution", "hw_text", "synthetic_count", "heldout_real", "REAL_ROW"]

SYNTHETIC_SEED = 20_251_123  # the synthetic reference set's seed, apart from any study seed
REAL_ROW = "real data (held-out)"  # the real-data row's variant name in records and tables


def cache_dir() -> Path:
    """Where reference statistics are cached (by content hash): $VARBENCH_CACHE or ~/.cache/varbench."""
    return Path(os.environ.get("VARBENCH_CACHE", Path.home() / ".cache" / "varbench"))


def reference_source(source: str | None) -> str:
    if source is None:
        raise ValueError("quality.reference is not set: give an ADM reference batch .npz (e.g. "
                         "VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion), an .npz or folder of "
                         "real images, or \"synthetic\" with the project's extractor")
    return source


def study_reference(q, hw: tuple[int, int], device: str):
    """The reference of a quality config for samples of H×W `hw`; "synthetic" renders the project's data set at
    that size, any other reference must hold images of that size (ValueError naming both otherwise)."""
    from varbench.harness.eval.quality import reference_stats

    source = reference_source(q.reference)
    if source == "synthetic":
        from varbench.harness.eval.synthetic import make_dataset, save_npz

        count, size = synthetic_count(q), hw[0]
        path = cache_dir() / "synthetic" / f"synthetic_{size}px_{count}_seed{SYNTHETIC_SEED}.npz"
        if not path.is_file():
            save_npz(path, *make_dataset(count, seed=SYNTHETIC_SEED, size=size))
        source = str(path)
    else:
        check_resolution(source, hw)
    return reference_stats(source, q.extractor, q.extractor_weights, cache_dir() / "reference", device)


def synthetic_count(q) -> int:
    """Images in the synthetic reference of a quality config: [0, count) of SYNTHETIC_SEED."""
    return max(q.num_samples, 1000)


def heldout_real(q, hw: tuple[int, int], device: str) -> tuple[Any, Any, dict[str, Any]] | str:
    """(images, reference, provenance) of the real-data row of quality config `q` for samples of H×W `hw`, or
    the reason it is absent (module docstring)."""
    import numpy as np
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from varbench.harness.eval.quality import Reference, folder_images, load_folder

    n, reference = q.num_samples, study_reference(q, hw, device)
    if q.reference == "synthetic":
        from varbench.harness.eval.synthetic import make_dataset

        start = synthetic_count(q)
        images = make_dataset(n, seed=SYNTHETIC_SEED, size=hw[0], start=start)[0]
        return images, reference, {"heldout": f"synthetic images {start}..{start + n - 1} of seed {SYNTHETIC_SEED}"
                                              f" (the reference holds 0..{start - 1})"}
    total = reference.num_images
    if total is None:
        return f"the reference {q.reference} holds statistics only, no images to hold out"
    if reference.stats_from != "images":
        return f"the reference's FID statistics ({reference.stats_from}) cover all its images; none can be held out"
    if total < 2 * n:
        return f"the reference holds {total} images, fewer than twice the {n} samples; none held out"
    path, keep = Path(q.reference), total - n
    if path.is_dir():
        images = load_folder(folder_images(path)[keep:])
    else:
        with np.load(path, allow_pickle=False) as npz:
            images = npz["arr_0"][keep:]
    feats = reference.features[:keep]
    stats = fid_features_to_statistics(feats)
    rest = Reference(f"{q.reference} (its first {keep} images)", reference.extractor,
                     f"{reference.sha256}:first{keep}", stats["mu"].astype(np.float64),
                     stats["sigma"].astype(np.float64), feats, "images")
    return images, rest, {"heldout": f"the last {n} of the reference's {total} images, against the other {keep}"}


def hw_text(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def check_resolution(source: str, hw: tuple[int, int]) -> None:
    ref = reference_resolution(source)
    if ref is not None and ref != tuple(hw):
        raise ValueError(f"quality.reference {source} holds {hw_text(ref)} px images but the samples are "
                         f"{hw_text(hw)} px: FID across resolutions is not comparable; give a reference of "
                         f"{hw_text(hw)} px images (or \"synthetic\", rendered at the samples' size)")


def reference_resolution(source: str) -> tuple[int, int] | None:
    """H×W of a reference's images read from headers only (an .npz's arr_0, a folder's image files); None for
    statistics without images (an ADM mu/sigma batch) or a source that is neither (its loader reports that)."""
    path = Path(source)
    if path.is_dir():
        return _folder_resolution(path)
    if path.suffix.lower() == ".npz":
        return _npz_resolution(path)
    return None


def _npz_resolution(path: Path) -> tuple[int, int] | None:
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
    except KeyError:
        return None  # no images: statistics only
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"quality.reference {path} is not a readable .npz ({err})") from None
    return (int(shape[1]), int(shape[2])) if len(shape) == 4 else None


def _folder_resolution(folder: Path) -> tuple[int, int] | None:
    from PIL import Image

    from varbench.harness.eval.quality import IMAGE_EXTENSIONS

    sizes = set()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            with Image.open(f) as image:  # reads the header only
                sizes.add((image.height, image.width))
    if len(sizes) > 1:
        raise ValueError(f"quality.reference {folder}: images of several sizes {sorted(sizes)[:4]}; "
                         f"a reference set has one size")
    return sizes.pop() if sizes else None
