"""The columns of published tables (`results/published/*.toml` name them), each with its label, unit and
format, and where our value is read from a varbench record. Table columns of our own records are the
metric registry's (metrics.py); a published column points at one of its record keys through `ours`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Column", "COLUMNS"]

_MIB, _GIB = 2.0**20, 2.0**30


@dataclass(frozen=True)
class Column:
    """A published column and where our value is: `ours` = "record_kind.metrics_key" (times `scale`); throughput and
    seconds_per_image use images_per_s (w/o VAE if the table's speed excludes it); `relative` is against our
    baseline row ("time": t / t_base, "speedup": t_base / t, "saving": 100 (1 - m / m_base))."""

    label: str
    unit: str = ""
    fmt: str = ".2f"
    ratio: bool = False  # also shown divided by the baseline row's value
    ours: str | None = None
    scale: float = 1.0
    relative: Literal["time", "speedup", "saving"] | None = None


COLUMNS: dict[str, Column] = {
    "steps": Column("steps", fmt=""), "params": Column("#params", fmt=""),
    "speedup": Column("speedup", "x", ".1f", ours="speed.seconds_per_image", relative="speedup"),
    "rel_cost": Column("rel. cost", "", ".1f", ours="speed.seconds_per_image", relative="time"),
    "latency_s": Column("latency", "s", ".2f", True, "speed.latency_ms_p50", 1e-3),
    "images_per_s": Column("throughput", "img/s", ".2f", True, "speed.throughput"),
    "memory_mb": Column("memory", "MB", ".0f", True, "speed.peak_memory_bytes", 1 / _MIB),
    "memory_gb": Column("memory", "GB", ".1f", True, "speed.peak_memory_bytes", 1 / _GIB),
    "kv_cache_mb": Column("KV cache", "MB", ".0f", True, "speed.kv_bytes", 1 / _MIB),
    "kv_cache_gb": Column("KV cache", "GB", ".1f", True, "speed.kv_bytes", 1 / _GIB),
    "running_gb": Column("running", "GB", ".1f", True), "params_gb": Column("params", "GB", ".1f", True),
    "memory_reduction_pct": Column("memory saved", "%", ".1f", ours="speed.peak_memory_bytes", relative="saving"),
    "budget_pct": Column("KV budget", "%", ".0f"), "kv_compression_pct": Column("KV compression", "%", ".0f"),
    "fid": Column("FID", ours="quality.fid"),
    "isc": Column("IS", fmt=".1f", ours="quality.isc_mean"),
    "precision": Column("precision", ours="quality.precision"), "recall": Column("recall", ours="quality.recall"),
    "fid_vs_full": Column("FID vs full"),
    "lpips_vs_full": Column("LPIPS vs full", ours="consistency.lpips"),
    "psnr_vs_full": Column("PSNR vs full", "dB", ours="consistency.psnr_db"),
    "ssim_vs_full": Column("SSIM vs full", fmt=".3f", ours="consistency.ssim"),
    **{key: Column(label) for key, label in (
        ("geneval_two_obj", "GenEval two obj."), ("geneval_position", "GenEval position"),
        ("geneval_color_attr", "GenEval color attr."), ("dpg_global", "DPG global"),
        ("dpg_relation", "DPG relation"), ("dpg_overall", "DPG overall"))},
    "geneval_overall": Column("GenEval overall", fmt=".3f"),
    "exponent": Column("exponent alpha", fmt="#.2g"), "prefactor": Column("prefactor beta", fmt="#.2g"),
    "pearson_r": Column("Pearson r", fmt=".3f"),
    # network evaluations per image (LlamaGen: one per token, 256 or 576; ZipAR, SJD, LANTERN fewer; VAR: its
    # scales), counted by bench for every variant
    "forward_steps": Column("forward passes", "", ".0f", True, "speed.network_evals"),
    "acceptance_rate": Column("acceptance rate", "", ".2f", ours="speed.accel_report.acceptance_rate"),
    "tokens": Column("tokens", fmt=""),
}
