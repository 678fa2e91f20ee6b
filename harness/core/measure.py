"""Timers, memory meters and FLOP-rate references, measured the same way for every variant.

GPU: CUDA events around each region, one synchronize per generation, allocator peak after a reset.
CPU: perf_counter, and the peak RSS delta over a baseline via Linux's VmHWM reset (docs/METRICS.md §5), taken
after the heap's freed pages are handed back to the OS (else a cell that fits in memory an earlier cell freed
but the allocator kept reads a peak of 0).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

__all__ = ["RegionTimer", "MemoryMeter", "p50_iqr", "peak_flops"]


def p50_iqr(values: Sequence[float]) -> tuple[float, float]:
    """Median and inter-quartile range (q75 - q25); IQR is 0 for fewer than two values."""
    if len(values) < 2:
        return float(values[0]), 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return float(statistics.median(values)), float(q[2] - q[0])


class RegionTimer:
    """Times named regions of one run; `elapsed_ms()` returns {name: [ms, ...]} after the run finishes.

    On CUDA each region records a pair of events and nothing waits until `elapsed_ms`, so timing adds no
    host sync inside the loop.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._spans: dict[str, list] = defaultdict(list)

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._spans[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._spans[name].append((t0, time.perf_counter()))

    def elapsed_ms(self) -> dict[str, list[float]]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: [s.elapsed_time(e) for s, e in v] for k, v in self._spans.items()}
        return {k: [(e - s) * 1e3 for s, e in v] for k, v in self._spans.items()}


class MemoryMeter:
    """Peak memory of a region: CUDA allocator peak, or peak RSS above the baseline on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "linux.vmhwm_delta"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _release_free_heap()  # the baseline is live memory, not pages freed by earlier cells
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.baseline = _proc_status_bytes("VmRSS")
        except OSError:
            self.method = "unavailable"

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.method == "unavailable":
            return None
        return max(0, _proc_status_bytes("VmHWM") - self.baseline)


@functools.cache
def _libc_malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS: nothing to trim with)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def _release_free_heap() -> None:
    """Returns freed heap pages to the OS so that RSS drops to the memory in use: glibc keeps freed chunks
    (its mmap threshold grows after large frees), and a later region reusing them never raises VmHWM."""
    gc.collect()
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


# Dense tensor-core peaks (FLOP/s) from the vendors' datasheets, for the precisions the engine runs.
_DATASHEET = {
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "L20": {torch.bfloat16: 119.5e12, torch.float16: 119.5e12, torch.float32: 59.8e12},
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s for MFU, and where it comes from: a datasheet entry for known GPUs, else a measured
    large matmul in `dtype` on the device (the achievable peak, so MFU there is relative to it)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in _DATASHEET.items():
            if key in name and dtype in table:
                return table[dtype], f"datasheet:{key}"
    return _measured_peak(str(device), dtype, torch.get_num_threads())


@functools.cache
def _measured_peak(device_name: str, dtype: torch.dtype, threads: int) -> tuple[float, str]:
    """Measured once per process (device, dtype, threads): an engine and its reference share one peak, so
    their MFUs differ only by their own speed, not by the matmul's run-to-run noise."""
    device = torch.device(device_name)
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = RegionTimer(device)
    for i in range(11):
        with timer.region("mm" if i else "warmup"):
            a @ b
    ms, _ = p50_iqr(timer.elapsed_ms()["mm"])
    return 2 * n**3 / (ms / 1e3), f"measured_matmul_{n}"
