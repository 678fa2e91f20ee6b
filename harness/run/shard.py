"""Sharded, resumable sampling for FID-50K-style quality passes over `torch.distributed` ranks.

Sample indices are cut into fixed blocks; each block is one `generate` call seeded by its block id alone, so
the images never depend on the number of ranks or on how a run was interrupted. Every block is written as
its own shard file atomically (tmp file, fsync, rename), finished shards are skipped on rerun, and rank 0
concatenates them into one ADM-style .npz at the end.

    torchrun --standalone --nproc_per_node 2 -m varbench.harness.run.shard --variant test_var \
        --num-samples 8 --block-size 2 --out DIR --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist

from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import SampleConfig

__all__ = ["SEED_STRIDE", "REPORT_PREFIX", "init_distributed", "barrier", "is_main", "block_seed",
           "shard_path", "sample_shards", "merge_shards", "load_merged", "CorruptSamplesError", "main"]

logger = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003  # prime stride: runs with different seeds never share a block seed in practice
REPORT_PREFIX = "shard report: "  # `main` logs one JSON line after this prefix per rank (parsed by tests)
_MANIFEST = "manifest.json"


def samples_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] to (B, H, W, 3) uint8, rounding (the ADM batch format)."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def init_distributed(device: str) -> tuple[int, int]:
    """Joins the torchrun process group (NCCL for CUDA, else gloo); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    cuda = torch.device(device).type == "cuda"
    if cuda:  # before init, so that NCCL binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Waits for every rank; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def block_seed(seed: int, block: int, block_size: int) -> int:
    """The g_seed of one block: it belongs to the block, never to a rank or a batch."""
    return seed * SEED_STRIDE + block * block_size


def _block_indices(block: int, block_size: int, num_samples: int) -> np.ndarray:
    return np.arange(block * block_size, min((block + 1) * block_size, num_samples), dtype=np.int64)


def _num_blocks(num_samples: int, block_size: int) -> int:
    if num_samples <= 0 or block_size <= 0:
        raise ValueError(f"need num_samples > 0 and block_size > 0, got {num_samples} and {block_size}")
    return -(-num_samples // block_size)


def shard_path(out_dir: Path, block: int) -> Path:
    return Path(out_dir) / f"shard_{block:06d}.npz"


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes through a tmp file in the same folder, fsyncs it and renames it over `path`: a kill leaves
    either the old file or the new one, never half of one."""
    # unique per process (ranks may write the same manifest at once); open() honours the umask, mkstemp not
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (POSIX); not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _load_shard(path: Path, expected: np.ndarray, g_seed: int) -> dict[str, np.ndarray]:
    """Reads a shard fully (so that zip CRCs are checked) and checks it is the block it claims to be."""
    with np.load(path, allow_pickle=False) as z:
        shard = {k: z[k] for k in ("arr_0", "labels", "indices", "g_seed")}
    images = shard["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(expected):
        raise ValueError(f"images of dtype {images.dtype} and shape {images.shape}")
    if not np.array_equal(shard["indices"], expected) or len(shard["labels"]) != len(expected):
        raise ValueError("indices or labels do not match the block")
    if int(shard["g_seed"]) != g_seed:
        raise ValueError(f"g_seed {int(shard['g_seed'])} != {g_seed}")
    return shard


def _manifest(variant: Any, num_samples: int, block_size: int, seed: int,
              sampling: SampleConfig) -> dict[str, Any]:
    raw = {"num_samples": num_samples, "block_size": block_size, "seed": seed, "seed_stride": SEED_STRIDE,
           "sampling": asdict(sampling), "variant": getattr(variant, "name", type(variant).__name__),
           "weights": getattr(variant, "weights", None)}
    return json.loads(json.dumps(raw))  # tuples become lists, as they read back from disk


def _check_or_write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    path = out_dir / _MANIFEST
    if not path.exists():  # every rank may get here; each writes the same bytes atomically
        _atomic_write(path, lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))
        return
    found = json.loads(path.read_text())
    if found != manifest:
        diff = {k: (found.get(k), manifest.get(k)) for k in manifest.keys() | found.keys()
                if found.get(k) != manifest.get(k)}
        raise ValueError(f"{out_dir} holds shards of a different run; refusing to mix them. Differences "
                         f"(on disk, requested): {diff}. Use another --out folder or delete this one.")


def sample_shards(variant: Any, out_dir: Path, num_samples: int, block_size: int, seed: int,
                  sampling: SampleConfig, rank: int = 0, world: int = 1, progress: bool = False) -> list[int]:
    """Generates this rank's missing blocks (b % world == rank) as shard files; returns their ids.

    Block b holds indices [b·block_size, ...) with labels index % num_classes and is one `generate` call
    with g_seed = seed·1_000_003 + b·block_size. Existing shards that load are kept (resume); corrupt ones
    are redone with a warning. Raises ValueError if out_dir holds shards of a different run.
    """
    out_dir = Path(out_dir)
    blocks = range(rank, _num_blocks(num_samples, block_size), world)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write_manifest(out_dir, _manifest(variant, num_samples, block_size, seed, sampling))
    num_classes = getattr(variant, "num_classes", 1000)
    todo = []
    for b in blocks:
        path, g_seed = shard_path(out_dir, b), block_seed(seed, b, block_size)
        if path.exists():
            try:
                _load_shard(path, _block_indices(b, block_size, num_samples), g_seed)
                continue
            except Exception as err:  # a zip cut short raises one of several types; all mean "redo it"
                logger.warning("shard %s is corrupt (%s: %s); generating it again", path.name,
                               type(err).__name__, err)
        todo.append(b)
    logger.info("rank %d/%d: %d of its %d blocks to generate", rank, world, len(todo), len(blocks))
    from tqdm.auto import tqdm  # imported here: only needed when sampling

    for b in tqdm(todo, desc="blocks", unit="block", leave=False, disable=not (progress and rank == 0)):
        idx = _block_indices(b, block_size, num_samples)
        g_seed = block_seed(seed, b, block_size)
        gen = generate(variant, torch.from_numpy(idx % num_classes), sampling, g_seed=g_seed)
        arrays = {"arr_0": samples_to_uint8(gen.images), "labels": gen.labels.cpu().numpy().astype(np.int64),
                  "indices": idx, "g_seed": np.int64(g_seed)}
        _atomic_write(shard_path(out_dir, b), lambda f: np.savez(f, **arrays))
    return todo


def merge_shards(out_dir: Path, num_samples: int, block_size: int) -> Path:
    """Concatenates every block in index order into out_dir.parent / "<out_dir name>.npz" (ADM-style:
    arr_0 uint8 NHWC, labels, indices, g_seeds) and returns its path. Call on rank 0 after a barrier."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / _MANIFEST).read_text())
    if (manifest["num_samples"], manifest["block_size"]) != (num_samples, block_size):
        raise ValueError(f"{out_dir} was sampled with num_samples {manifest['num_samples']} and block_size "
                         f"{manifest['block_size']}, not {num_samples} and {block_size}")
    parts, bad = [], []
    for b in range(_num_blocks(num_samples, block_size)):
        idx = _block_indices(b, block_size, num_samples)
        try:
            parts.append(_load_shard(shard_path(out_dir, b), idx, block_seed(manifest["seed"], b, block_size)))
        except Exception:  # missing and corrupt blocks are reported together below
            bad.append(b)
    if bad:
        raise RuntimeError(f"{out_dir}: {len(bad)} blocks missing or corrupt: {bad}; run the sampling again "
                           "to generate them")
    merged = {"arr_0": np.concatenate([p["arr_0"] for p in parts]),
              "labels": np.concatenate([p["labels"] for p in parts]),
              "indices": np.concatenate([p["indices"] for p in parts]),
              "g_seeds": np.concatenate([np.full(len(p["indices"]), p["g_seed"], np.int64) for p in parts])}
    path = out_dir.parent / f"{out_dir.name}.npz"
    _atomic_write(path, lambda f: np.savez(f, **merged))
    for stale in out_dir.glob(".*.tmp"):  # left by killed runs; every rank is past the barrier by now
        stale.unlink(missing_ok=True)
    logger.info("merged %d samples into %s", num_samples, path)
    return path


class CorruptSamplesError(ValueError):
    """A merged samples file that cannot be read and cannot be rebuilt from its shards."""


def _read_merged(path: Path, expected: int | None) -> np.ndarray:
    """arr_0 of a merged file, read fully (zip CRCs checked) and checked to be N x H x W x 3 uint8 images."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError("the file does not exist") from None
    except Exception:  # numpy's own message would suggest allow_pickle, which is never the fix here
        raise ValueError("not an .npz archive (random bytes, a file cut short, or another format)") from None
    with archive as z:
        if "arr_0" not in z.files:
            raise ValueError(f"no arr_0 array (arrays: {z.files})")
        try:
            images = z["arr_0"]
        except Exception as err:  # a bad CRC, a cut member, a zlib error
            raise ValueError(f"its arr_0 is damaged ({type(err).__name__}: {err})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"arr_0 is {images.dtype} of shape {images.shape}, not N x H x W x 3 uint8 images")
    if expected is not None and len(images) != expected:
        raise ValueError(f"it holds {len(images)} images, not the {expected} expected")
    return images


def _remerge(path: Path, expected: int | None) -> np.ndarray:
    """Merges `<path without .npz>/`'s shards into `path` again and reads the result."""
    shard_dir = path.with_suffix("")
    if not (shard_dir / _MANIFEST).is_file():
        raise ValueError(f"no shard folder {shard_dir} to merge it from")
    manifest = json.loads((shard_dir / _MANIFEST).read_text())
    merge_shards(shard_dir, manifest["num_samples"], manifest["block_size"])
    return _read_merged(path, expected)


def load_merged(path: str | os.PathLike, expected: int | None = None) -> np.ndarray:
    """The images (arr_0, N x H x W x 3 uint8) of a merged samples file `<shard folder>.npz`, N = `expected`
    when given. A missing, unreadable or wrong file is merged again from its shard folder when that still
    holds every block; otherwise CorruptSamplesError names the file and says to delete it to sample again."""
    path = Path(path)
    try:
        return _read_merged(path, expected)
    except ValueError as err:
        problem = str(err)
    try:
        images = _remerge(path, expected)
    except Exception as err:  # missing or corrupt shards, a foreign manifest: all mean "sample again"
        raise CorruptSamplesError(f"merged samples file {path} is unusable: {problem}; it cannot be rebuilt: "
                                  f"{err}. Delete {path} to sample again") from None
    logger.warning("merged samples file %s was unusable (%s); merged it again from its shards", path, problem)
    return images


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m varbench.harness.run.shard", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", required=True, help="registered variant name (e.g. test_var, var_d16)")
    p.add_argument("--num-samples", type=int, required=True, help="images to generate in all")
    p.add_argument("--block-size", type=int, default=25, help="samples per block (one generate call)")
    p.add_argument("--out", type=Path, required=True, help="shard folder; the merged file is <out>.npz")
    p.add_argument("--seed", type=int, default=0, help="run seed; block b uses g_seed seed*1000003 + b*block_size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (default: torch's)")
    p.add_argument("--cfg", type=float, default=SampleConfig.cfg, help="classifier-free guidance scale")
    p.add_argument("--top-k", type=int, default=SampleConfig.top_k, help="top-k filter (0: off)")
    p.add_argument("--top-p", type=float, default=SampleConfig.top_p, help="top-p filter (0: off)")
    p.add_argument("--no-merge", action="store_true", help="only write shards")
    p.add_argument("--progress", action="store_true", help="progress bar on rank 0")
    args = p.parse_args(argv)
    try:  # bad sampling settings are a usage error, named before any process group or model starts
        args.sampling = SampleConfig(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of `torchrun -m varbench.harness.run.shard`: samples this rank's blocks, rank 0 merges."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from varbench.harness.core.registry import create_variant  # the package imports the registry; keep this module light to import

    rank, world = init_distributed(args.device)
    device = args.device
    if torch.device(device).type == "cuda" and world > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        variant = create_variant(args.variant, device=device)
        done = sample_shards(variant, args.out, args.num_samples, args.block_size, args.seed, args.sampling,
                             rank=rank, world=world, progress=args.progress)
        barrier()
        merged = None
        if rank == 0 and not args.no_merge:
            merged = str(merge_shards(args.out, args.num_samples, args.block_size))
        logger.info("%s%s", REPORT_PREFIX, json.dumps({"rank": rank, "world": world, "generated": done,
                                                        "merged": merged}))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
