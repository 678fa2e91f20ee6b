"""Paper-style tables of records (pure functions of records; no device work)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tabulate import tabulate

__all__ = ["speed_table"]

_MIB = 2**20


def speed_table(records: Iterable[dict[str, Any]], fmt: str = "github") -> str:
    """Throughput, latency, decode time, memory and KV bytes of every speed record (↑ higher is better)."""
    rows = []
    for r in records:
        if r.get("kind") != "speed":
            continue
        m = r["metrics"]
        peak = m.get("peak_memory_bytes")
        rows.append({
            "variant": r["cell"]["variant"],
            "params": f"{m['params'] / 1e6:.1f}M",
            "batch": m["batch_size"],
            "precision": m["precision"],
            "img/s ↑": f"{m['images_per_s']:.2f}",
            "latency ms ↓": f"{m['latency_ms_p50']:.0f} ± {m['latency_ms_iqr']:.0f}",
            "VAE decode ms ↓": f"{m['vae_decode_ms']:.0f}",
            "peak mem MiB ↓": "n/a" if peak is None else f"{peak / _MIB:.0f}",
            "KV MiB ↓": f"{m['kv_bytes'] / _MIB:.1f}",
            "MFU": f"{100 * m['mfu']:.1f}%",
        })
    return tabulate(rows, headers="keys", tablefmt=fmt) if rows else "(no speed records)"
