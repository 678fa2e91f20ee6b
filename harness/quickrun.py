"""The embedded default run: a small VAR configuration, end to end on a CPU in about a minute.

For each variant: a speed pass (warm-up excluded, median of repeats, VAE decode apart, memory, KV bytes),
then a batch of samples kept as uint8 images with their labels and seeds (ADM-style .npz), and one record
per measurement appended to `records.jsonl` in the output folder.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bench import bench_variant
from .loop import generate
from .records import append_record, capture_env, config_hash
from .registry import VARIANTS
from .sampling import SampleConfig

__all__ = ["DEFAULT_VARIANTS", "quick_run", "samples_to_uint8"]

DEFAULT_VARIANTS = ("test_var",)
SEED_BLOCK = 16  # seeds belong to fixed blocks of sample indices, so samples do not depend on batching


def samples_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] to (B, H, W, 3) uint8, rounding (the ADM batch format)."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def quick_run(out_dir: Path, variant_names: Sequence[str] = DEFAULT_VARIANTS, batch: int = 4,
              num_samples: int = 16, repeats: int = 3, sampling: SampleConfig = SampleConfig(),
              progress: Callable[[str], Any] | None = None) -> list[dict[str, Any]]:
    """Runs the default study; returns the records it appended to out_dir/records.jsonl."""
    import varbench.variants  # noqa: F401  (registers the built-in variants)

    factories = [VARIANTS.get(name) for name in variant_names]  # unknown names fail before any work
    say = progress or (lambda msg: None)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    env = capture_env("cpu")
    records = []
    for name, factory in zip(variant_names, factories):
        say(f"{name}: building")
        variant = factory()
        cell = {"variant": name, "batch_size": batch, "sampling": asdict(sampling)}
        say(f"{name}: speed pass (batch {batch}, {repeats} repeats)")
        speed = bench_variant(variant, batch, sampling, warmup=1, repeats=repeats)
        record = {"id": f"{run_id}/{name}/speed", "kind": "speed", "study": "default", "cell": cell,
                  "config_hash": config_hash(cell), "metrics": speed, "env": env,
                  "weights": "random (test model: quality numbers on it mean nothing)"}
        append_record(out_dir / "records.jsonl", record)
        records.append(record)

        say(f"{name}: sampling {num_samples} images")
        t0 = time.perf_counter()
        images, labels, seeds = [], [], []
        for first in range(0, num_samples, SEED_BLOCK):
            idx = torch.arange(first, min(first + SEED_BLOCK, num_samples))
            gen = generate(variant, idx % variant.num_classes, sampling, g_seed=first)
            images.append(samples_to_uint8(gen.images))
            labels.append(gen.labels.cpu().numpy())
            seeds.append(np.full(len(idx), first))
        path = out_dir / "samples" / f"{name}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, arr_0=np.concatenate(images), labels=np.concatenate(labels), seeds=np.concatenate(seeds))
        sample_record = {"id": f"{run_id}/{name}/samples", "kind": "samples", "study": "default", "cell": cell,
                         "config_hash": config_hash(cell), "env": env, "samples": str(path),
                         "metrics": {"num_samples": num_samples, "sampling_s": time.perf_counter() - t0}}
        append_record(out_dir / "records.jsonl", sample_record)
        records.append(sample_record)
    return records
