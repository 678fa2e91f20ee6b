"""Study files: frozen dataclasses are the schema, TOML is the format, `--set key=value` overrides.

A study is variants × KV policies × accelerations × sweep points (× batch sizes for speed), plus sampling,
engine, speed and quality settings. Loading checks every key and value against the dataclasses: an unknown key names the valid
ones (and the closest), a bad value names the field and the type it needs.

    study = "kv_budget"
    variants = ["var_d16"]
    kv_policies = ["full", "scalekv"]
    [quality]
    num_samples = 10_000
    [sweep]
    "kv_args.scalekv.budget" = [0.05, 0.1, 0.2]
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from varbench.harness.core.sampling import SampleConfig
from varbench.variants.engine import EngineConfig

__all__ = ["SpeedConfig", "QualityConfig", "StudyConfig", "load_study", "parse_study",
           "apply_overrides", "to_dict", "hashed_quality", "QUALITY_METRICS", "TEXT_METRICS"]

QUALITY_METRICS = ("fid", "kid", "isc", "prc")  # the default set
TEXT_METRICS = ("clip",)  # text-to-image only: need quality.prompts


@dataclass(frozen=True)
class SpeedConfig:
    """The speed pass: each batch size is warmed up, then timed `repeats` times (median and IQR).

    reference: also time every cell in the reference mode (`EngineConfig.reference`: the official algorithm and
    numerics, every engine feature off, at the study's precision), so that a method's speedup reads against both
    baselines, the engine and the official code's loop, from one run.
    """

    batch_sizes: tuple[int, ...] = (1, 16, 64)
    warmup: int = 2
    repeats: int = 10
    reference: bool = False


@dataclass(frozen=True)
class QualityConfig:
    """The quality pass: `num_samples` images with labels index % num_classes, generated in blocks of
    `block_size` whose seeds depend only on the block (so sharding never changes a sample).

    reference: an ADM reference batch .npz (mu/sigma, e.g. VIRTUAL_imagenet256_labeled.npz), an .npz of
    uint8 images (arr_0), a folder of images, or "synthetic" (the project's procedural data set, rendered at
    the model's resolution; meaningful only with the project's extractor). extractor: torch-fidelity's
    "inception-v3-compat" (needs its weights file locally) or the project's "varbench-cnn".

    Text-to-image variants (those taking `prompts`, e.g. Infinity): `prompts` names a prompt set
    (harness/eval/prompts.py: coco30k, mjhq30k, geneval, synthetic_captions), read from `prompts_path` or its
    $VARBENCH_PROMPTS_<NAME>; the variant is given the set's first num_samples prompts in file order, and sample
    i draws prompt i mod that count. Metric "clip" (CLIP score, 100·max(cos, 0), harness/eval/clip_score.py)
    scores each image against its prompt with `clip_model`: a local CLIP folder or Hugging Face id (default
    openai/clip-vit-large-patch14, never downloaded), or "test-clip" (a tiny random CLIP, for smoke runs).
    """

    num_samples: int = 50_000
    block_size: int = 50
    metrics: tuple[str, ...] = QUALITY_METRICS
    extractor: str = "inception-v3-compat"
    extractor_weights: str | None = None
    reference: str | None = None
    bootstrap: int = 100
    consistency: bool = True
    lpips_weights: str | None = None
    prompts: str | None = None
    prompts_path: str | None = None
    clip_model: str | None = None


@dataclass(frozen=True)
class StudyConfig:
    """One study: what to run and how to measure it."""

    study: str
    variants: tuple[str, ...]
    kv_policies: tuple[str, ...] = ("full",)
    accelerations: tuple[str, ...] = ("none",)  # training-free modifiers of the loop (variants/accel/)
    variant_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    kv_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    accel_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweep: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    baseline: str | None = None
    device: str = "auto"
    seed: int = 0
    threads: int = 0
    engine: EngineConfig = EngineConfig()  # precision "auto": bf16 on a GPU, fp32 on a CPU
    sample: SampleConfig = SampleConfig()
    speed: SpeedConfig | None = SpeedConfig()
    quality: QualityConfig | None = None  # `speed = false` / no [quality] table: that pass is skipped

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("study.variants is empty: name at least one variant (`varbench list` shows them)")
        if not self.kv_policies:
            raise ValueError("study.kv_policies is empty: name at least one KV policy, e.g. [\"full\"] "
                             "(the whole cache)")
        if not self.accelerations:
            raise ValueError("study.accelerations is empty: name at least one, e.g. [\"none\"] (plain loop)")
        if self.speed is None and self.quality is None:
            raise ValueError("nothing to measure: speed and quality are both off; keep a [speed] or a [quality] "
                             "table (or drop `speed = false` / `quality = false`)")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (torch's default) or a thread count >= 1, got {self.threads}")
        if self.quality is not None:
            bad = [m for m in self.quality.metrics if m not in QUALITY_METRICS + TEXT_METRICS]
            if bad:
                raise ValueError(f"unknown quality metric(s) {bad}; valid: {list(QUALITY_METRICS + TEXT_METRICS)}")
            if "clip" in self.quality.metrics and self.quality.prompts is None:
                raise ValueError("quality.metrics has \"clip\" but quality.prompts names no prompt set: CLIP score "
                                 "compares each image with its prompt (e.g. prompts = \"coco30k\")")
            if self.quality.num_samples < 1 or self.quality.block_size < 1:
                raise ValueError("quality.num_samples and quality.block_size must be >= 1")
            if self.quality.bootstrap < 0:
                raise ValueError(f"quality.bootstrap must be 0 (no intervals) or a number of resamples >= 1, "
                                 f"got {self.quality.bootstrap}")
        if self.speed is not None and (not self.speed.batch_sizes or min(self.speed.batch_sizes) < 1
                                       or self.speed.repeats < 1 or self.speed.warmup < 0):
            raise ValueError("speed.batch_sizes must be >= 1, speed.repeats >= 1 and speed.warmup >= 0")
        for key in self.sweep:
            _check_path(key)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fail_key(key: str, where: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {where + close[0]!r}?)" if close else ""
    return ValueError(f"unknown key {where + key!r}{hint}; valid keys: {', '.join(valid)}")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Converts a TOML value to the annotated type, or raises ValueError naming the field."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if type(None) in options and (value is None or (value is False and any(map(dataclasses.is_dataclass,
                                                                                      options)))):
            return None  # TOML has no null: `speed = false` turns an optional pass off
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[-1] if len(errors) == 1 else f"{where}: {value!r} fits none of "
                         f"{[getattr(o, '__name__', str(o)) for o in options]}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table of {hint.__name__} settings, got {value!r}")
        return _build(hint, value, f"{where}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and
                                                 (hint is bool or not isinstance(value, bool))):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _fail_key(key, where, names)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ValueError(f"missing key(s) {[where + m for m in missing]}")
    kwargs = {k: _coerce(v, hints[k], where + k) for k, v in data.items()}
    return cls(**kwargs)


def parse_study(data: dict[str, Any]) -> StudyConfig:
    """Validates a study given as a dict (TOML's parse tree)."""
    return _build(StudyConfig, data)


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Reads a TOML study file and applies `key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    return parse_study(apply_overrides(data, overrides))


def _parse_value(text: str) -> Any:
    """A TOML value (number, bool, string, list, inline table); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _check_path(key: str) -> None:
    """Checks that a dotted key (a sweep axis or an override) names a study setting."""
    parts = key.split(".")
    cls: Any = StudyConfig
    for i, part in enumerate(parts):
        if cls is None:
            return  # inside a free-form table (variant_args, kv_args)
        hints = _hints(cls)
        if part not in hints:
            raise _fail_key(part, ".".join(parts[:i]) + ("." if i else ""), list(hints))
        hint = hints[part]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nested = hint if dataclasses.is_dataclass(hint) else next((a for a in args if dataclasses.is_dataclass(a)),
                                                                   None)
        if nested is None and i < len(parts) - 1 and typing.get_origin(hint) is not dict:
            raise ValueError(f"{key!r}: {'.'.join(parts[:i + 1])} is not a table")
        cls = nested


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `a.b.c=value` overrides to a parse tree (a copy); values are parsed as TOML."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad override {item!r}: write key=value, e.g. quality.num_samples=1000")
        _check_path(key.strip())
        set_path(data, key.strip(), _parse_value(text.strip()))
    return data


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Sets data[a][b][c] = value for key "a.b.c", creating tables on the way."""
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ValueError(f"{key!r}: {part} is not a table")
    data[last] = value


def to_dict(obj: Any) -> Any:
    """A study (or any part of it) as plain JSON/TOML data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# Quality settings added after results were first recorded enter a config hash only when set, so that a folder
# measured before they existed resumes instead of measuring everything again.
_HASHED_WHEN_SET = ("prompts", "prompts_path", "clip_model")


def hashed_quality(q: QualityConfig) -> dict[str, Any]:
    """`to_dict(q)` as config hashes see it."""
    return {k: v for k, v in to_dict(q).items() if not (k in _HASHED_WHEN_SET and v is None)}


def sweep_points(study: StudyConfig) -> list[dict[str, Any]]:
    """The cartesian product of the sweep axes, as {dotted key: value} dicts ([{}] without a sweep)."""
    keys = list(study.sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(study.sweep[k] for k in keys))]


def at_point(study: StudyConfig, point: dict[str, Any]) -> StudyConfig:
    """The study with one sweep point's values set (validated like any override)."""
    if not point:
        return study
    data = to_dict(study)
    data["sweep"] = {}
    for key, value in point.items():
        set_path(data, key, value)
    return parse_study(data)
