"""The study runner: plans cells, measures each one the same way, appends one record per measurement.

plan(study) -> cells (variant × KV policy × sweep point); for each cell:
    speed    one record per batch size: warm-up excluded, median/IQR of repeats, per-scale latency, VAE decode
             apart, peak memory (method recorded), KV bytes read from the cache (harness/run/bench.py)
    quality  samples in seed blocks, sharded over torchrun ranks (harness/run/shard.py), merged to an ADM-style
             .npz, scored with torch-fidelity (harness/eval/quality.py) with bootstrap intervals
    consistency  PSNR/SSIM (LPIPS when its weights are local) against the baseline cell's samples, same seeds
and once per quality setting a real-data row: held-out real images scored like a cell (reference.heldout_real).
Every record carries the cell, its config hash and the environment. A rerun skips measurements whose
(kind, config hash) is already recorded, so an interrupted study resumes where it stopped.

Before anything is measured: names and argument keys are checked (cells.check_names), the output folder is
checked writable and locked (`<out>/.lock`, flock: a second run on the same folder is refused; the lock dies
with its process, so a killed run leaves none behind).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .cells import Cell, check_names, plan
from .outdir import OutputFolderError, lock_out, prepare_out
from .config import StudyConfig, hashed_quality, to_dict
from .text import clip_metrics, prompt_args, takes_prompts
from .reference import REAL_ROW, cache_dir, heldout_real, hw_text, reference_resolution, study_reference
from varbench.harness.core.records import SCHEMA, append_record, capture_env, config_hash, load_records
from varbench.harness.core.registry import KV_POLICIES
from varbench.variants.engine import EngineConfig

__all__ = ["Cell", "plan", "check_names", "run_study", "resolve_device", "cache_dir", "OutputFolderError",
           "prepare_out", "lock_out", "reference_resolution"]

log = logging.getLogger(__name__)
GRID_IMAGES = 64  # each cell's grid: its first 64 samples, drawn from the same seeds in every cell


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _precision(study: StudyConfig, device: str) -> str:
    return study.engine.resolved(device).precision


def build_cell(cell: Cell, device: str, engine: EngineConfig | None = None):
    """The cell's variant on `device`, with the study's engine configuration (or `engine`), the cell's KV policy
    and its acceleration."""
    from varbench.harness.core.registry import create_variant
    from varbench.variants.accel import apply_acceleration

    engine = (engine or cell.config.engine).resolved(device)
    policy = KV_POLICIES.get(cell.kv_policy)(**cell.kv_args)
    args = {**cell.variant_args, **prompt_args(cell.variant, cell.variant_args, cell.config.quality)}
    try:
        variant = create_variant(cell.variant, engine=engine, device=device, kv_policy=policy, **args)
    except TypeError as err:
        raise ValueError(f"variant_args.{cell.variant}: {err}") from None
    return apply_acceleration(variant, cell.acceleration, **cell.accel_args) if cell.accelerated else variant


class _Run:
    """State shared by the measurements of one invocation."""

    def __init__(self, study: StudyConfig, out: Path, rank: int, world: int, device: str):
        self.study, self.out, self.rank, self.world, self.device = study, out, rank, world, device
        self.run_id = new_run_id()
        self.env = capture_env(device)
        self.records_path = out / "records.jsonl"
        self.count = 0

    def done(self) -> dict[tuple[str, str], dict[str, Any]]:
        if not self.records_path.exists():
            return {}
        return {(r.get("kind"), r.get("config_hash")): r for r in load_records(self.records_path)}

    def record(self, kind: str, cell: Cell, chash: str, metrics: dict[str, Any], started: float,
               engine: EngineConfig | None = None, **extra: Any) -> dict[str, Any]:
        self.count += 1
        rec = make_record(f"{self.run_id}/{self.count}", kind, self.study.study, cell.describe(), cell.label, chash,
                          _precision(cell.config, self.device), cell.config.seed, to_dict(cell.config.sample),
                          to_dict(engine or cell.config.engine), self.device, metrics, self.env, started, **extra)
        append_record(self.records_path, rec)
        return rec


def new_run_id() -> str:
    """A run's id: UTC time and process id; records are `<run id>/<count>`."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid():x}"


def make_record(rec_id: str, kind: str, study: str, cell: dict[str, Any], label: str, chash: str, precision: str,
                seed: int, sample: dict[str, Any], engine: dict[str, Any], device: str, metrics: dict[str, Any],
                env: dict[str, Any], started: float, **extra: Any) -> dict[str, Any]:
    """One record in the study schema (also written by `varbench bench`); `started` is a time.time()."""
    return {"schema": SCHEMA, "id": rec_id, "kind": kind, "study": study, "cell": cell, "label": label,
            "config_hash": chash, "precision": precision, "seed": seed, "sample": sample, "engine": engine,
            "device": device, "metrics": metrics, **extra, "env": env,
            "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 3)}


def _speed_engines(study: StudyConfig) -> list[EngineConfig]:
    """The engines a cell is timed with: the study's, then (speed.reference) the reference mode at the study's
    precision."""
    engines = [study.engine]
    if study.speed.reference and study.engine != EngineConfig.reference(study.engine.precision):
        engines.append(EngineConfig.reference(study.engine.precision))
    return engines


def _speed_hash(cell: Cell, batch: int, device: str, engine: EngineConfig) -> str:
    c = cell.config
    speed = {k: v for k, v in to_dict(c.speed).items() if k != "reference"}  # what one record's timing depends on
    return config_hash({"kind": "speed", "cell": cell.describe(), "batch": batch, "device": device,
                        "engine": to_dict(engine), "precision": _precision(c, device),
                        "sample": to_dict(c.sample), "speed": speed, "threads": c.threads})


def _scorer(q) -> str | None:
    """The extractor weights' sha256 ("random-init" for the seeded CNN): a folder resumed after the weights (or
    the feature scale they carry) changed rescores its samples instead of keeping numbers on another scale."""
    from varbench.harness.eval.extractors import resolve_weights, weights_sha256

    if not q.metrics:
        return None
    return weights_sha256(resolve_weights(q.extractor, q.extractor_weights)) or "random-init"


def _quality_hash(cell: Cell, device: str) -> str:
    c = cell.config
    return config_hash({"kind": "quality", "cell": cell.describe(), "device": device, "seed": c.seed,
                        "engine": to_dict(c.engine), "precision": _precision(c, device),
                        "sample": to_dict(c.sample), "quality": hashed_quality(c.quality), "scorer": _scorer(c.quality)})


def _samples_hash(cell: Cell, device: str) -> str:
    """What the samples depend on (not the scoring settings), so rescoring reuses them."""
    c = cell.config
    q = replace(c.quality, metrics=(), extractor="", extractor_weights=None, reference=None, bootstrap=0,
                consistency=False, lpips_weights=None, clip_model=None)
    return config_hash({"cell": cell.describe(), "device": device, "seed": c.seed, "engine": to_dict(c.engine),
                        "precision": _precision(c, device), "sample": to_dict(c.sample), "quality": hashed_quality(q)})


def run_study(study: StudyConfig, out: str | Path, progress: bool = False) -> list[dict[str, Any]]:
    """Runs (or resumes) a study into `out`; returns the records appended by this call (rank 0). Raises
    OutputFolderError, before measuring anything, when `out` is not writable or another run holds it."""
    from .shard import init_distributed

    check_names(study)
    device = resolve_device(study.device)
    rank, world = init_distributed(device)
    if device == "cuda" and world > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    out = Path(out)
    prepare_out(out)
    lock = lock_out(out, rank)
    threads = torch.get_num_threads()
    if study.threads:
        torch.set_num_threads(study.threads)
    try:
        return _run_cells(study, out, rank, world, device, progress)
    finally:
        torch.set_num_threads(threads)
        os.close(lock)  # releases the flock


def _run_cells(study: StudyConfig, out: Path, rank: int, world: int, device: str,
               progress: bool) -> list[dict[str, Any]]:
    from .bench import BatchTooLargeError
    from .shard import barrier

    cells = plan(study)
    run = _Run(study, out, rank, world, device)
    new: list[dict[str, Any]] = []
    bar = _bar(progress and rank == 0, cells, study)
    samples: dict[int, Path] = {}
    baseline = cells[_baseline_index(study, cells)].label
    for i, cell in enumerate(cells):
        variant = None
        if cell.config.speed is not None:
            built: dict[EngineConfig, Any] = {}
            for batch in cell.config.speed.batch_sizes:
                for engine in _speed_engines(cell.config):
                    chash = _speed_hash(cell, batch, device, engine)
                    if rank == 0 and (("speed", chash) not in run.done()):
                        mode = "" if engine == cell.config.engine else " (reference mode)"
                        bar.set_description(f"{cell.label}: speed, batch {batch}{mode}")
                        built[engine] = built.get(engine) or build_cell(cell, device, engine)
                        try:
                            new.append(_speed(run, cell, built[engine], batch, chash, engine, baseline))
                        except BatchTooLargeError as err:  # the other batches and cells still run; no record,
                            log.warning("%s: %s; skipped", cell.label, err)  # so a rerun elsewhere retries it
                    bar.update(1)
            variant = built.get(cell.config.engine)
        barrier()
        if cell.config.quality is not None:
            bar.set_description(f"{cell.label}: quality")
            path, rec = _quality(run, cell, variant, bar)
            samples[i] = path
            new += [rec] if rec else []
            bar.update(1)
    if rank == 0:
        new += _real_rows(run, cells, samples, bar)
    if study.quality is not None and study.quality.consistency and rank == 0:
        new += _consistency_all(run, cells, samples, bar)
    bar.close()
    return new


def _bar(enabled: bool, cells: list[Cell], study: StudyConfig):
    from tqdm import tqdm

    per_cell = len(study.speed.batch_sizes) * len(_speed_engines(study)) if study.speed else 0
    total = len(cells) * (per_cell + (1 if study.quality else 0))
    return tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True)


def _speed(run: _Run, cell: Cell, variant, batch: int, chash: str, engine: EngineConfig,
           baseline: str) -> dict[str, Any]:
    """One speed record; `baseline` (the study's baseline cell) lets a table give every row its speedup."""
    from .bench import bench_variant

    t0 = time.time()
    s = cell.config.speed
    metrics = bench_variant(variant, batch, cell.config.sample, s.warmup, s.repeats, seed=cell.config.seed)
    return run.record("speed", cell, chash, metrics, t0, engine=engine, batch_size=batch, weights=variant.weights,
                      baseline=baseline)


def _baseline_index(study: StudyConfig, cells: list[Cell]) -> int:
    """The baseline cell: the baseline variant (default: the first) with the first KV policy, at the first
    acceleration and sweep point (plan order)."""
    name = study.baseline or study.variants[0]
    return next(j for j, c in enumerate(cells) if c.variant == name and c.kv_policy == study.kv_policies[0])


def _quality(run: _Run, cell: Cell, variant, bar) -> tuple[Path, dict[str, Any] | None]:
    """Samples (sharded, resumable) and scores one cell; returns the merged samples and the record."""
    from varbench.harness.eval.quality import score
    from .shard import barrier, merge_shards, sample_shards

    q, chash = cell.config.quality, _quality_hash(cell, run.device)
    shard_dir = run.out / "samples" / _samples_hash(cell, run.device)
    merged = shard_dir.parent / f"{shard_dir.name}.npz"
    done = run.done().get(("quality", chash))
    if done is not None and merged.is_file():
        return merged, None
    t0 = time.time()
    if not merged.is_file():
        variant = variant or build_cell(cell, run.device)
        sample_shards(variant, shard_dir, q.num_samples, q.block_size, cell.config.seed, cell.config.sample,
                      rank=run.rank, world=run.world, progress=run.rank == 0 and not bar.disable)
        barrier()
        if run.rank == 0:
            merge_shards(shard_dir, q.num_samples, q.block_size)
            _weights_file(merged).write_text(json.dumps({"weights": variant.weights}) + "\n")
        barrier()
    if run.rank != 0:
        return merged, None
    images, weights = _load_images(merged), _samples_weights(cell, merged, variant, run.device)
    image_metrics = [m for m in q.metrics if m != "clip"]
    needs_reference = any(m != "isc" for m in image_metrics)
    hw = (images.shape[1], images.shape[2])
    reference = study_reference(q, hw, run.device) if needs_reference else None
    metrics = score(images, reference, image_metrics, q.extractor, q.extractor_weights, device=run.device,
                    bootstrap=q.bootstrap, seed=cell.config.seed) if image_metrics else {}
    if "clip" in q.metrics and takes_prompts(cell.variant):
        import numpy as np

        with np.load(merged) as saved:
            metrics |= clip_metrics(images, saved["labels"], q, run.device, cell.config.seed)
    provenance = {k: metrics.pop(k) for k in list(metrics) if isinstance(metrics[k], str)}
    if reference is not None:
        provenance.update(_scored_against(q, hw))
    from varbench.harness.eval.grids import save_grid

    grid = save_grid(images[:GRID_IMAGES], _grid_path(run, merged))
    return merged, run.record("quality", cell, chash, metrics, t0, samples=str(merged), quality=provenance,
                              num_samples=q.num_samples, weights=weights, grid=str(grid))


def _scored_against(q, hw: tuple[int, int]) -> dict[str, Any]:
    """What samples were scored against, as configured, and at what size."""
    ref_hw = hw if q.reference == "synthetic" else reference_resolution(q.reference)
    return {"reference_setting": q.reference,
            "reference_resolution": hw_text(ref_hw) if ref_hw else "unknown (statistics only)"}


def _real_rows(run: _Run, cells: list[Cell], samples: dict[int, Path], bar) -> list[dict[str, Any]]:
    """One real-data record per distinct quality setting of the scored cells (module docstring), at the size of
    that setting's samples; resumable like any record. Absent held-out images give a record saying why."""
    from varbench.harness.eval.quality import score

    out, seen = [], set()
    for i, path in samples.items():
        cell, q = cells[i], cells[i].config.quality
        hw = reference_resolution(str(path))
        if hw is None or not any(m not in ("isc", "clip") for m in q.metrics):
            continue
        plain = replace(q, consistency=False, lpips_weights=None)
        chash = config_hash({"kind": "quality", "real_data": True, "hw": list(hw), "device": run.device,
                             "seed": cell.config.seed, "quality": hashed_quality(plain), "scorer": _scorer(q)})
        if chash in seen or ("quality", chash) in run.done():
            continue
        seen.add(chash)
        bar.set_description(f"{REAL_ROW}: quality")
        t0, held = time.time(), heldout_real(q, hw, run.device)
        metrics, provenance = {}, {"heldout": f"absent: {held}"} if isinstance(held, str) else held[2]
        if not isinstance(held, str):
            metrics = score(held[0], held[1], [m for m in q.metrics if m != "clip"], q.extractor, q.extractor_weights, device=run.device,
                            bootstrap=q.bootstrap, seed=cell.config.seed)
            provenance.update({k: metrics.pop(k) for k in list(metrics) if isinstance(metrics[k], str)})
        provenance.update(_scored_against(q, hw))
        run.count += 1
        rec = make_record(f"{run.run_id}/{run.count}", "quality", run.study.study,
                          {"variant": REAL_ROW, "kv_policy": "-", "variant_args": {}, "kv_args": {}, "sweep": {}},
                          REAL_ROW, chash, None, cell.config.seed, {}, {}, run.device, metrics, run.env, t0,
                          quality=provenance, num_samples=q.num_samples, real_data=True, weights=None)
        append_record(run.records_path, rec)
        out.append(rec)
    return out


def _weights_file(merged: Path) -> Path:
    """Beside merged samples: the weights that drew them, so a resumed run's record still names them."""
    return merged.with_suffix(".weights.json")


def _samples_weights(cell: Cell, merged: Path, variant, device: str) -> str:
    """The weights behind merged samples: the built variant's, else the note written at merge time, else
    (samples merged by an older version) the variant built again, without sampling."""
    if variant is not None:
        return variant.weights
    try:
        return json.loads(_weights_file(merged).read_text())["weights"]
    except (OSError, ValueError, KeyError, TypeError):
        return build_cell(cell, device).weights


def _load_images(path: Path):
    """Merged samples, checked (a corrupt file is re-merged from its shards or named, never a bare traceback)."""
    from .shard import load_merged

    return load_merged(path)


def _grid_path(run: _Run, samples: Path, suffix: str = "") -> Path:
    """Sample grids live beside the records: grids/<samples hash><suffix>.png (same seeds in every cell)."""
    return run.out / "grids" / f"{samples.stem}{suffix}.png"


def _consistency_all(run: _Run, cells: list[Cell], samples: dict[int, Path], bar) -> list[dict[str, Any]]:
    """PSNR/SSIM/LPIPS and the paired FID difference of every cell against the baseline cell (the baseline
    variant with the first KV policy at the first sweep point), on the same seeds; cells whose sample sets
    differ in shape are skipped."""
    from varbench.harness.eval.consistency import consistency
    from varbench.harness.eval.grids import save_comparison
    from varbench.harness.eval.quality import fid_difference

    study, out = run.study, []
    base = _baseline_index(study, cells)
    done = run.done()
    for i, cell in enumerate(cells):
        if i == base or i not in samples or base not in samples:
            continue
        chash = config_hash({"kind": "consistency", "cell": samples[i].name, "baseline": samples[base].name,
                             "fid_delta": True})
        if ("consistency", chash) in done:
            continue
        a, b = _load_images(samples[base]), _load_images(samples[i])
        if a.shape != b.shape:
            log.warning("%s: no consistency, its samples %s differ from the baseline's %s", cell.label,
                        b.shape, a.shape)
            continue
        bar.set_description(f"{cell.label}: consistency")
        t0 = time.time()
        grid = save_comparison(a, b, _grid_path(run, samples[i], "_vs_baseline"), n=8)
        q = cell.config.quality
        metrics = consistency(a, b, q.lpips_weights, bootstrap=q.bootstrap, seed=cell.config.seed)
        if "fid" in q.metrics:  # paired: the variant's FID minus the baseline's on the same seeds
            metrics.update(fid_difference(b, a, study_reference(q, a.shape[1:3], run.device), q.extractor,
                                          q.extractor_weights, run.device, q.bootstrap, cell.config.seed))
        out.append(run.record("consistency", cell, chash, metrics, t0, baseline=cells[base].label,
                              grid=str(grid)))
    return out
