"""The metrics registry: every number a table can show, with its label, direction, unit and format.

A metric is a reader of one record's `metrics` dict, registered by decorator with how to print it; tables are
built from whatever registered metrics the records hold, so an out-of-tree package can add columns through the
`varbench.metrics` entry-point group. Spreads are the IQR (speed, over repeats) or a 95% bootstrap interval
(quality), stored beside the value as `<key>_iqr` or `<key>_ci95`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from varbench.harness.core.registry import METRICS

__all__ = ["MetricSpec", "register_metric", "metrics_for"]

_MIB = 2.0**20


@dataclass(frozen=True)
class MetricSpec:
    """How to read and print one metric. Calling it reads (value, spread) from a record's metrics."""

    name: str
    label: str
    kind: Literal["speed", "quality", "consistency"]
    higher_is_better: bool | None
    fmt: str = ".2f"
    scale: float = 1.0
    read: Callable[[dict[str, Any]], Any] | None = None
    spread_key: str | None = None  # default: <name>_iqr or <name>_ci95

    @property
    def header(self) -> str:
        arrow = {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]
        return self.label + arrow

    def __call__(self, metrics: dict[str, Any]) -> tuple[float | None, Any]:
        value = self.read(metrics) if self.read else metrics.get(self.name)
        keys = (self.spread_key,) if self.spread_key else (f"{self.name}_iqr", f"{self.name}_ci95")
        spread = next((metrics[k] for k in keys if metrics.get(k) is not None), None)
        return value, spread

    def format(self, metrics: dict[str, Any]) -> str:
        value, spread = self(metrics)
        if value is None:
            return "n/a"
        text = f"{value * self.scale:{self.fmt}}"
        if isinstance(spread, (int, float)):
            text += f" ± {spread * self.scale:{self.fmt}}"
        elif isinstance(spread, (list, tuple)) and len(spread) == 2 and None not in spread:
            text += f" [{spread[0] * self.scale:{self.fmt}}, {spread[1] * self.scale:{self.fmt}}]"
        return text


def register_metric(spec: MetricSpec) -> MetricSpec:
    METRICS.add(spec.name, spec)
    return spec


for _spec in (
    MetricSpec("images_per_s", "img/s", "speed", True),
    MetricSpec("images_per_s_without_vae", "img/s w/o VAE", "speed", True),
    MetricSpec("latency_ms_p50", "latency ms", "speed", False, ".1f", spread_key="latency_ms_iqr"),
    MetricSpec("vae_decode_ms", "VAE decode ms", "speed", False, ".1f"),
    MetricSpec("peak_memory_bytes", "peak mem MiB", "speed", False, ".0f", 1 / _MIB),
    MetricSpec("kv_bytes", "KV MiB", "speed", False, ".2f", 1 / _MIB),
    MetricSpec("kv_bytes_current", "KV current scale MiB", "speed", False, ".2f", 1 / _MIB),
    MetricSpec("mfu", "MFU %", "speed", True, ".1f", 100.0),
    MetricSpec("network_evals", "steps", "speed", False, ".0f"),  # network evaluations per image
    MetricSpec("fid", "FID", "quality", False),
    MetricSpec("kid_mean", "KID×1e3", "quality", False, ".2f", 1e3),
    MetricSpec("isc_mean", "IS", "quality", True),
    MetricSpec("precision", "precision", "quality", True, ".3f"),
    MetricSpec("recall", "recall", "quality", True, ".3f"),
    MetricSpec("clip_score", "CLIP score", "quality", True),  # text-to-image cells (quality.prompts)
    MetricSpec("fid_delta", "ΔFID vs baseline", "consistency", False),
    MetricSpec("psnr_db", "PSNR dB", "consistency", True),
    MetricSpec("ssim", "SSIM", "consistency", True, ".3f"),
    MetricSpec("lpips", "LPIPS", "consistency", False, ".3f"),
):
    register_metric(_spec)


def metrics_for(kind: str) -> list[MetricSpec]:
    """Registered metrics of one record kind, in registration order."""
    specs = [METRICS.get(name) for name in METRICS.list(sort=False)]  # registration order
    return [s for s in specs if getattr(s, "kind", None) == kind]
