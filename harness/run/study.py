"""The study runner: plans cells, measures each one the same way, appends one record per measurement.

plan(study) -> cells (variant × KV policy × sweep point); for each cell:
    speed    one record per batch size: warm-up excluded, median/IQR of repeats, per-scale latency, VAE decode
             apart, peak memory (method recorded), KV bytes read from the cache (harness/run/bench.py)
    quality  samples in seed blocks, sharded over torchrun ranks (harness/run/shard.py), merged to an ADM-style
             .npz, scored with torch-fidelity (harness/eval/quality.py) with bootstrap intervals
    consistency  PSNR/SSIM (LPIPS when its weights are local) against the baseline cell's samples, same seeds
Every record carries the cell, its config hash and the environment. A rerun skips measurements whose
(kind, config hash) is already recorded, so an interrupted study resumes where it stopped.

Before anything is measured: names and argument keys are checked (check_names), the output folder is
checked writable and locked (`<out>/.lock`, flock: a second run on the same folder is refused; the lock dies
with its process, so a killed run leaves none behind).
"""

from __future__ import annotations

import datetime as dt
import difflib
import fcntl
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import StudyConfig, at_point, sweep_points, to_dict
from varbench.harness.core.records import SCHEMA, append_record, capture_env, config_hash, load_records
from varbench.harness.core.registry import KV_POLICIES, VARIANTS

__all__ = ["Cell", "plan", "check_names", "run_study", "resolve_device", "cache_dir", "OutputFolderError",
           "prepare_out", "lock_out", "reference_resolution"]

log = logging.getLogger(__name__)
SYNTHETIC_SEED = 20_251_123  # the synthetic reference set's seed, apart from any study seed
GRID_IMAGES = 64  # each cell's grid: its first 64 samples, drawn from the same seeds in every cell
SET_BY_STUDY = ("engine", "device", "kv_policy")  # variant arguments build_cell passes itself
_WARNED: set[str] = set()


class OutputFolderError(OSError):
    """The output folder cannot be written, or another run holds it."""


@dataclass(frozen=True)
class Cell:
    """One variant × KV policy × sweep point, with the study as it reads at that point."""

    variant: str
    kv_policy: str
    point: dict[str, Any]
    config: StudyConfig = field(repr=False)

    @property
    def variant_args(self) -> dict[str, Any]:
        return dict(self.config.variant_args.get(self.variant, {}))

    @property
    def kv_args(self) -> dict[str, Any]:
        return dict(self.config.kv_args.get(self.kv_policy, {}))

    def describe(self) -> dict[str, Any]:
        return {"variant": self.variant, "kv_policy": self.kv_policy, "variant_args": self.variant_args,
                "kv_args": self.kv_args, "sweep": self.point}

    @property
    def label(self) -> str:
        extra = [f"{k}={v}" for k, v in self.point.items()]
        return " ".join([self.variant, self.kv_policy, *extra])


def _touches(key: str, variant: str, policy: str) -> bool:
    """Whether a sweep axis can change a cell: variant_args.X.* only touches variant X, kv_args.P.* policy P."""
    section, _, rest = key.partition(".")
    owner = rest.partition(".")[0]
    return not ((section == "variant_args" and owner != variant) or (section == "kv_args" and owner != policy))


def plan(study: StudyConfig) -> list[Cell]:
    """Every distinct cell of the study, in a stable order. A sweep axis that cannot change a cell (another
    variant's or policy's arguments) is left out of its point, so that cell is measured once, not per value;
    a variant without a KV cache (factory attribute `has_kv_cache = False`, e.g. HMAR) runs with the first
    policy only."""
    import varbench.variants  # noqa: F401  (registers the built-in variants)

    cells, seen = [], set()
    for point in sweep_points(study):
        config = at_point(study, point)
        for variant in study.variants:
            cached = variant not in VARIANTS or getattr(VARIANTS.get(variant), "has_kv_cache", True)
            for policy in study.kv_policies if cached else study.kv_policies[:1]:  # no cache: one policy
                own = {k: v for k, v in point.items() if _touches(k, variant, policy)}
                key = (variant, policy, json.dumps(own, sort_keys=True, default=str))
                if key not in seen:
                    seen.add(key)
                    cells.append(Cell(variant, policy, own, config))
    return cells


def check_names(study: StudyConfig) -> None:
    """Fails at once (KeyError with "did you mean") on an unknown variant or KV policy."""
    import varbench.variants  # noqa: F401  (registers the built-in variants and policies)

    for name in study.variants:
        VARIANTS.get(name)
    for name in study.kv_policies:
        KV_POLICIES.get(name)
    if study.baseline is not None and study.baseline not in study.variants:
        raise ValueError(f"baseline {study.baseline!r} is not one of the study's variants {list(study.variants)}")
    check_args(study)
    q = study.quality
    if q is not None and q.metrics:  # files the scoring needs: missing ones fail now, not after the sampling
        from varbench.harness.eval.extractors import resolve_weights

        resolve_weights(q.extractor, q.extractor_weights)
        if q.reference is None and q.metrics != ("isc",):
            _reference_source(None)
        if q.reference not in (None, "synthetic") and not Path(q.reference).exists():
            raise FileNotFoundError(f"quality.reference {q.reference!r} does not exist")


def check_args(study: StudyConfig) -> None:
    """Fails before any measurement on a [variant_args.X] / [kv_args.P] table (or sweep axis) that names no
    variant / KV policy, on a variant argument its factory does not take, and on KV arguments its policy
    rejects; every message lists the valid names or keys."""
    owners = {"variant_args": (study.variants, VARIANTS), "kv_args": (study.kv_policies, KV_POLICIES)}
    for section, (names, registry) in owners.items():
        for owner in getattr(study, section):
            _check_owner(section, owner, names, registry)
    for key in study.sweep:
        section, _, rest = key.partition(".")
        if section in owners and rest:
            _check_owner(section, rest.partition(".")[0], *owners[section])
    checked: set[str] = set()
    for cell in plan(study):
        _check_variant_keys(cell.variant, cell.variant_args)
        kv_key = json.dumps([cell.kv_policy, cell.kv_args], sort_keys=True, default=str)
        if kv_key not in checked:  # building a policy validates its arguments and calibrates nothing yet
            checked.add(kv_key)
            try:
                KV_POLICIES.get(cell.kv_policy)(**cell.kv_args)
            except (TypeError, ValueError) as err:
                raise ValueError(f"kv_args.{cell.kv_policy}: {err}") from None


def _check_owner(section: str, owner: str, names: tuple[str, ...], registry) -> None:
    """A table's owner must be one of the study's names; a registered one the study does not run only warns
    (a study file's table for a variant that `--variants` left out)."""
    if owner in names:
        return
    kind = "variant" if section == "variant_args" else "KV policy"
    if owner in registry:
        message = f"[{section}.{owner}]: {kind} {owner!r} is not in this study ({', '.join(names)}), its " \
                  f"arguments are unused"
        if message not in _WARNED:  # the CLI and run_study both check: say it once
            _WARNED.add(message)
            log.warning(message)
        return
    close = difflib.get_close_matches(owner, [*names, *registry.list()], n=1)
    hint = f" (did you mean {section}.{close[0]}?)" if close else ""
    raise ValueError(f"[{section}.{owner}]: no {kind} is called {owner!r}{hint}; this study's: {', '.join(names)}")


def _check_variant_keys(variant: str, args: dict[str, Any]) -> None:
    """Variant arguments against the registered factory's signature; a factory taking **kwargs is not checked
    (its builder reports unknown ones)."""
    reserved = sorted(set(args) & set(SET_BY_STUDY))
    if reserved:
        raise ValueError(f"variant_args.{variant}: {', '.join(map(repr, reserved))} cannot be a variant argument: "
                         f"the study sets it (its [engine] table, `device`, `kv_policies`)")
    params = inspect.signature(VARIANTS.get(variant)).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and p.name not in SET_BY_STUDY]
    for key in sorted(args):
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"variant_args.{variant}: unknown key {key!r}{hint}; valid keys: "
                             f"{', '.join(valid) or '(none)'}")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cache_dir() -> Path:
    """Where reference statistics are cached (by content hash): $VARBENCH_CACHE or ~/.cache/varbench."""
    return Path(os.environ.get("VARBENCH_CACHE", Path.home() / ".cache" / "varbench"))


def _precision(study: StudyConfig, device: str) -> str:
    if study.engine.precision != "auto":
        return study.engine.precision
    return "bf16" if device.startswith("cuda") else "fp32"


def build_cell(cell: Cell, device: str):
    """The cell's variant on `device`, with the study's engine settings and the cell's KV policy."""
    from varbench.variants.var import EngineConfig

    from varbench.harness.core.registry import create_variant

    engine = EngineConfig(_precision(cell.config, device), compile=cell.config.engine.compile,
                          cuda_graphs=cell.config.engine.cuda_graphs)
    policy = KV_POLICIES.get(cell.kv_policy)(**cell.kv_args)
    try:
        return create_variant(cell.variant, engine=engine, device=device, kv_policy=policy, **cell.variant_args)
    except TypeError as err:
        raise ValueError(f"variant_args.{cell.variant}: {err}") from None


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
               **extra: Any) -> dict[str, Any]:
        self.count += 1
        rec = make_record(f"{self.run_id}/{self.count}", kind, self.study.study, cell.describe(), cell.label, chash,
                          _precision(cell.config, self.device), cell.config.seed, to_dict(cell.config.sample),
                          to_dict(cell.config.engine), self.device, metrics, self.env, started, **extra)
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


def _speed_hash(cell: Cell, batch: int, device: str) -> str:
    c = cell.config
    return config_hash({"kind": "speed", "cell": cell.describe(), "batch": batch, "device": device,
                        "engine": to_dict(c.engine), "precision": _precision(c, device),
                        "sample": to_dict(c.sample), "speed": to_dict(c.speed), "threads": c.threads})


def _quality_hash(cell: Cell, device: str) -> str:
    c = cell.config
    return config_hash({"kind": "quality", "cell": cell.describe(), "device": device, "seed": c.seed,
                        "engine": to_dict(c.engine), "precision": _precision(c, device),
                        "sample": to_dict(c.sample), "quality": to_dict(c.quality)})


def _samples_hash(cell: Cell, device: str) -> str:
    """What the samples depend on (not the scoring settings), so rescoring reuses them."""
    c = cell.config
    q = replace(c.quality, metrics=(), extractor="", extractor_weights=None, reference=None, bootstrap=0,
                consistency=False, lpips_weights=None)
    return config_hash({"cell": cell.describe(), "device": device, "seed": c.seed, "engine": to_dict(c.engine),
                        "precision": _precision(c, device), "sample": to_dict(c.sample), "quality": to_dict(q)})


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


def prepare_out(out: Path) -> None:
    """Creates `out` and writes (then removes) a probe file there, so a read-only or misplaced folder fails
    now and not after the first measurement."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise OutputFolderError(f"output folder {out} is not writable ({err.strerror or err}); "
                                f"give a folder you can write to with --out") from None


def lock_out(out: Path, rank: int = 0) -> int:
    """Takes `<out>/.lock` (`.lock.rank<R>` for other torchrun ranks) without waiting and writes our pid into
    it; returns the descriptor, whose closing (or the process's death) releases the lock."""
    path = out / (".lock" if rank == 0 else f".lock.rank{rank}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputFolderError(f"output folder {out} is in use by another varbench run (pid {holder}); wait "
                                f"for it to finish or give another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _run_cells(study: StudyConfig, out: Path, rank: int, world: int, device: str,
               progress: bool) -> list[dict[str, Any]]:
    from .shard import barrier

    cells = plan(study)
    run = _Run(study, out, rank, world, device)
    new: list[dict[str, Any]] = []
    bar = _bar(progress and rank == 0, cells, study)
    samples: dict[int, Path] = {}
    for i, cell in enumerate(cells):
        variant = None
        if cell.config.speed is not None:
            for batch in cell.config.speed.batch_sizes:
                chash = _speed_hash(cell, batch, device)
                if rank == 0 and (("speed", chash) not in run.done()):
                    bar.set_description(f"{cell.label}: speed, batch {batch}")
                    variant = variant or build_cell(cell, device)
                    new.append(_speed(run, cell, variant, batch, chash))
                bar.update(1)
        barrier()
        if cell.config.quality is not None:
            bar.set_description(f"{cell.label}: quality")
            path, rec = _quality(run, cell, variant, bar)
            samples[i] = path
            new += [rec] if rec else []
            bar.update(1)
    if study.quality is not None and study.quality.consistency and rank == 0:
        new += _consistency_all(run, cells, samples, bar)
    bar.close()
    return new


def _bar(enabled: bool, cells: list[Cell], study: StudyConfig):
    from tqdm import tqdm

    per_cell = len(study.speed.batch_sizes) if study.speed else 0
    total = len(cells) * (per_cell + (1 if study.quality else 0))
    return tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True)


def _speed(run: _Run, cell: Cell, variant, batch: int, chash: str) -> dict[str, Any]:
    from .bench import bench_variant

    t0 = time.time()
    s = cell.config.speed
    metrics = bench_variant(variant, batch, cell.config.sample, s.warmup, s.repeats, seed=cell.config.seed)
    return run.record("speed", cell, chash, metrics, t0, batch_size=batch, weights=variant.weights)


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
    needs_reference = any(m != "isc" for m in q.metrics)
    hw = (images.shape[1], images.shape[2])
    reference = _reference(q, hw, run.device) if needs_reference else None
    metrics = score(images, reference, q.metrics, q.extractor, q.extractor_weights, device=run.device,
                    bootstrap=q.bootstrap, seed=cell.config.seed) if q.metrics else {}
    provenance = {k: metrics.pop(k) for k in list(metrics) if isinstance(metrics[k], str)}
    if reference is not None:  # what the samples were scored against, as configured, and at what size
        ref_hw = hw if q.reference == "synthetic" else reference_resolution(q.reference)
        provenance.update(reference_setting=q.reference,
                          reference_resolution=_hw_text(ref_hw) if ref_hw else "unknown (statistics only)")
    from varbench.harness.eval.grids import save_grid

    grid = save_grid(images[:GRID_IMAGES], _grid_path(run, merged))
    return merged, run.record("quality", cell, chash, metrics, t0, samples=str(merged), quality=provenance,
                              num_samples=q.num_samples, weights=weights, grid=str(grid))


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


def _reference_source(source: str | None) -> str:
    if source is None:
        raise ValueError("quality.reference is not set: give an ADM reference batch .npz (e.g. "
                         "VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion), an .npz or folder of "
                         "real images, or \"synthetic\" with the project's extractor")
    return source


def _reference(q, hw: tuple[int, int], device: str):
    """The reference of a quality config for samples of H×W `hw`; "synthetic" renders the project's data set at
    that size, any other reference must hold images of that size (ValueError naming both otherwise)."""
    from varbench.harness.eval.quality import reference_stats

    source = _reference_source(q.reference)
    if source == "synthetic":
        from varbench.harness.eval.synthetic import make_dataset, save_npz

        count, size = max(q.num_samples, 1000), hw[0]
        path = cache_dir() / "synthetic" / f"synthetic_{size}px_{count}_seed{SYNTHETIC_SEED}.npz"
        if not path.is_file():
            save_npz(path, *make_dataset(count, seed=SYNTHETIC_SEED, size=size))
        source = str(path)
    else:
        _check_resolution(source, hw)
    return reference_stats(source, q.extractor, q.extractor_weights, cache_dir() / "reference", device)


def _hw_text(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def _check_resolution(source: str, hw: tuple[int, int]) -> None:
    ref = reference_resolution(source)
    if ref is not None and ref != tuple(hw):
        raise ValueError(f"quality.reference {source} holds {_hw_text(ref)} px images but the samples are "
                         f"{_hw_text(hw)} px: FID across resolutions is not comparable; give a reference of "
                         f"{_hw_text(hw)} px images (or \"synthetic\", rendered at the samples' size)")


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


def _consistency_all(run: _Run, cells: list[Cell], samples: dict[int, Path], bar) -> list[dict[str, Any]]:
    """PSNR/SSIM/LPIPS and the paired FID difference of every cell against the baseline cell (the baseline
    variant with the first KV policy at the first sweep point), on the same seeds; cells whose sample sets
    differ in shape are skipped."""
    from varbench.harness.eval.consistency import consistency
    from varbench.harness.eval.grids import save_comparison
    from varbench.harness.eval.quality import fid_difference

    study, out = run.study, []
    base_variant = study.baseline or study.variants[0]
    base = next(j for j, c in enumerate(cells) if c.variant == base_variant and c.kv_policy == study.kv_policies[0])
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
            metrics.update(fid_difference(b, a, _reference(q, a.shape[1:3], run.device), q.extractor,
                                          q.extractor_weights, run.device, q.bootstrap, cell.config.seed))
        out.append(run.record("consistency", cell, chash, metrics, t0, baseline=cells[base].label,
                              grid=str(grid)))
    return out
