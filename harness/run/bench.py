"""Speed, memory and FLOP utilisation of one variant at one batch size and precision.

Warm-up runs (compilation, graph capture, allocator growth) are excluded; each timed repeat is one full
generation with the VAE decode timed apart, because papers differ on whether they include it (CoDe's table
excludes it, the VAR zoo timings include it). Medians and IQRs, never a mean alone. A batch the device cannot
hold raises BatchTooLargeError (a ValueError) naming the batch and a size that may fit, not the allocator's
traceback.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from varbench.harness.core.loop import Variant, generate
from varbench.harness.core.measure import MemoryMeter, RegionTimer, p50_iqr, peak_flops
from varbench.harness.core.sampling import SampleConfig
from varbench.variants.accel import accel_report
from varbench.variants.vqvae import decode_flops as vae_decode_flops  # noqa: F401  (re-exported)

__all__ = ["bench_variant", "vae_decode_flops", "BatchTooLargeError"]

_OOM = re.compile(r"out of memory|can't allocate|cannot allocate|DefaultCPUAllocator", re.IGNORECASE)


class BatchTooLargeError(ValueError):
    """A batch the device's memory cannot hold."""


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or bool(_OOM.search(str(err)))


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _smaller_batch(batch: int, message: str, device: torch.device) -> int:
    """A batch that may fit: from the failed request's size per image and the memory available (half of it,
    other buffers live too), else a quarter of the batch."""
    tried = re.search(r"allocate (\d+) bytes", message)
    free = _available_bytes(device)
    if tried and free and int(tried.group(1)) > 0:
        return max(1, min(batch - 1, int(free / 2 / (int(tried.group(1)) / batch))))
    return max(1, batch // 4)


def _generate(variant: Variant, labels: torch.Tensor, sampling: SampleConfig, **kwargs: Any):
    """`generate`, with an allocator failure turned into a message naming the batch and a size that may fit."""
    try:
        return generate(variant, labels, sampling, **kwargs)
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        batch, device = len(labels), labels.device
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BatchTooLargeError(f"batch {batch} does not fit in {device.type} memory ({first}); try a smaller "
                                 f"batch, e.g. {_smaller_batch(batch, str(err), device)}") from None


def bench_variant(variant: Variant, batch: int, sampling: SampleConfig = SampleConfig(), warmup: int = 1,
                  repeats: int = 5, seed: int = 0) -> dict[str, Any]:
    """Measures `variant` generating `batch` images; returns one flat dict. Reads only the `Variant` protocol."""
    device = variant.device
    labels = torch.arange(batch, device=device) % variant.num_classes
    t0 = time.perf_counter()
    for i in range(warmup):
        _generate(variant, labels, sampling, g_seed=seed + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0

    meter = MemoryMeter(device)
    meter.start()
    totals, decodes, per_scale = [], [], []
    for r in range(repeats):
        timer = RegionTimer(device)
        with timer.region("total"):
            gen = _generate(variant, labels, sampling, g_seed=seed + r, timer=timer.region)
        ms = timer.elapsed_ms()
        totals.append(ms["total"][0])
        decodes.append(ms["decode"][0])
        per_scale.append([sum(ms[f"scale{si}"]) for si in range(len(variant.patch_nums))])
        steps = sum(len(ms.get(f"scale{si}", ())) for si in range(len(variant.patch_nums)))
    peak = meter.peak_bytes()

    total_ms, total_iqr = p50_iqr(totals)
    decode_ms, _ = p50_iqr(decodes)
    no_vae_ms, _ = p50_iqr([t - d for t, d in zip(totals, decodes)])
    net_flops, vae_flops = variant.flops_per_image(), variant.vae_decode_flops()
    images_per_s = batch / (total_ms / 1e3)
    peak_rate, peak_source = peak_flops(device, variant.dtype)
    report = variant.kv_report(gen.state)
    kv = report["kv_bytes_per_scale"]
    # Each forward's own keys and values, apart from what is kept for later scales: a compressing policy
    # shrinks `kv_bytes` but every scale still attends over its whole map (and CoDe's prefill over scales 0..N).
    kv_current = report["kv_bytes_current_per_scale"]
    return {
        "variant": variant.name,
        "depth": variant.depth,
        "params": variant.param_count(),
        "batch_size": batch,
        "precision": variant.engine.precision,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "engine": asdict(variant.engine),
        "images_per_s": images_per_s,
        "images_per_s_without_vae": batch / (no_vae_ms / 1e3),
        "latency_ms_p50": total_ms,
        "latency_ms_iqr": total_iqr,
        "n": repeats,
        "latency_ms_per_scale": [p50_iqr(col)[0] for col in zip(*per_scale)],
        # the loop's steps in the last timed call, each one network evaluation per image (VAR: one per scale;
        # HMAR: its masked steps too; LlamaGen: one per token, fewer with SJD/ZipAR); a step that an acceleration
        # skips for the whole batch still counts (its report says which)
        "network_evals": steps,
        "vae_decode_ms": decode_ms,
        "warmup_s": warmup_s,
        "peak_memory_bytes": peak,
        "memory_method": meter.method,
        "kv_bytes": max(kv) if kv else 0,
        "kv_bytes_per_scale": kv,
        "kv_bytes_current": max(kv_current) if kv_current else 0,
        "kv_bytes_current_per_scale": kv_current,
        "model_flops_per_image": net_flops + vae_flops,
        "model_flops_per_image_without_vae": net_flops,
        "mfu": images_per_s * (net_flops + vae_flops) / peak_rate,
        "peak_flops": peak_rate,
        "peak_flops_source": peak_source,
    } | _per_model(variant, per_scale, kv, kv_current) | _accelerated(variant, gen.state)


# -- per-model reporting: variants made of several models (CoDe's drafter and refiner) ------------------
def _per_model(variant, per_scale: list[list[float]], kv_per_scale: list[int],
               current_per_scale: list[int]) -> dict[str, Any]:
    """`latency_ms_per_model` (median over repeats of the summed scale regions each model ran, its
    prefill included) and `memory_bytes_per_model` ({model: {"param_bytes", "kv_bytes", "kv_bytes_current"}},
    kv_bytes the most its cache held after any of its scales, kv_bytes_current the largest forward's own keys
    and values) for a variant of several models; {} for one model."""
    if len(variant.models) < 2:
        return {}
    latency, memory = {}, {}
    for name, scales in variant.stages():
        latency[name] = p50_iqr([sum(row[si] for si in scales) for row in per_scale])[0]
        memory[name] = {"param_bytes": variant.models[name].param_bytes(),
                        "kv_bytes": _most(kv_per_scale, scales), "kv_bytes_current": _most(current_per_scale, scales)}
    return {"latency_ms_per_model": latency, "memory_bytes_per_model": memory}


def _accelerated(variant, state) -> dict[str, Any]:
    """What an acceleration did in the last timed call (tokens computed per scale, steps skipped, guided rows),
    and its settings; {} for a plain variant."""
    report = accel_report(variant, state)
    return {"accel_report": report} | getattr(variant, "acceleration_record", {}) if report else {}


def _most(per_scale: list[int], scales: tuple[int, ...]) -> int:
    return max((per_scale[si] for si in scales if si < len(per_scale)), default=0)
