"""The GPU check's steps (`python -m varbench.harness.run.gpucheck`): its sizes, its shared state (device,
weights built once) and one small function per measurement, each returning an Outcome the runner records."""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from varbench.harness.core.sampling import SampleConfig

from .bench import bench_variant
from .config import to_dict

__all__ = ["DRY", "FULL", "Check", "Outcome", "Sizes", "Step", "StepTimeout", "plan_steps", "free_memory", "skipped"]

STUDY = "gpucheck"
SAMPLING = SampleConfig(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False)  # `varbench bench`'s defaults
GREEDY = SampleConfig(cfg=1.5, top_k=1, top_p=1.0, more_smooth=False)
VAE_FILES = ("vae_ch160v4096z32.pth", "vae.pth")  # the official name, then the fixtures'
CODE_DRAFT_STEPS = 8  # sample_CoDe.py's N
DEFAULT_TIME_LIMIT_S = 480.0


@dataclass(frozen=True)
class Sizes:
    """Model and measurement sizes of one mode: the real ones on a GPU, tiny ones for the CPU dry run."""

    small: int  # stands for d16
    large: int  # stands for d30
    vae_ch: int
    hmar_layers_train: int
    batch: int  # stands for batch 64
    repeats: int
    kv_repeats: int
    greedy_batch: int
    warmup: int
    precision: str  # of the speed steps; bf16 on a CPU without bf16 units is emulated and slow
    numerics: tuple[str, ...]  # precisions of the engine-vs-reference token comparison


FULL = Sizes(small=16, large=30, vae_ch=160, hmar_layers_train=8, batch=64, repeats=3, kv_repeats=2, greedy_batch=4,
             warmup=1, precision="bf16", numerics=("fp32", "bf16"))
DRY = Sizes(small=2, large=3, vae_ch=32, hmar_layers_train=1, batch=2, repeats=1, kv_repeats=1, greedy_batch=2,
            warmup=0, precision="fp32", numerics=("fp32",))


@dataclass
class Outcome:
    """What one step measured: the record's kind, metrics and the settings it ran with."""

    kind: str  # speed, conformance, kernel, numerics, skipped, error
    metrics: dict[str, Any]
    variant: str = ""
    kv_policy: str = "full"
    precision: str = "bf16"
    engine: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    weights: str | None = None


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[[Check], Outcome]
    budget_s: float  # estimated seconds on an H100 (a cap where SIGALRM is usable)


class StepTimeout(Exception):
    """A step ran past its budget."""


# -- the check's state: device, sizes, weights, models built once ------------------------------------
class Check:
    """What every step reads: device, mode and sizes, where weights and fixtures come from, the time left,
    earlier steps' metrics, and the master weights (built once, copied for every variant)."""

    def __init__(self, device: str, out: Path, dry: bool, ckpt_dir: Path | None = None,
                 fixtures: Path | None = None, time_limit_s: float = DEFAULT_TIME_LIMIT_S):
        self.device, self.out, self.dry = torch.device(device), out, dry
        self.sizes = DRY if dry else FULL
        self.ckpt_dir, self.fixtures, self.time_limit_s = ckpt_dir, fixtures, time_limit_s
        self.cuda = self.device.type == "cuda"
        self.results: dict[str, dict[str, Any]] = {}  # step name -> metrics, for comparisons between steps
        self._nets: dict[int, Any] = {}  # depth -> VARNet master (CPU, fp32); every variant gets a copy
        self._vae = None
        self.deadline = time.monotonic() + time_limit_s  # reset when the run starts

    def remaining(self) -> float:
        """Seconds left before the check's time limit."""
        return self.deadline - time.monotonic()

    @property
    def weights_note(self) -> str:
        if self.ckpt_dir is not None:
            return f"checkpoints from {self.ckpt_dir}"
        if self.dry:
            return (f"random init (seed 0) at tiny stand-in sizes (depths {self.sizes.small} and {self.sizes.large}, "
                    f"VQVAE ch {self.sizes.vae_ch}): checks that every path runs, no real numbers")
        return "random init (seed 0) at the real architectures: speed and memory only, no quality"

    def checkpoint(self, names: tuple[str, ...]) -> Path:
        for name in names:
            if (self.ckpt_dir / name).is_file():
                return self.ckpt_dir / name
        held = ", ".join(sorted(p.name for p in self.ckpt_dir.iterdir())) or "(nothing)"
        raise FileNotFoundError(f"--ckpt-dir {self.ckpt_dir} has none of {', '.join(names)}; it holds: {held}")

    def weights_of(self, depth: int) -> str:
        if self.ckpt_dir is None:
            return "random (seed 0)"
        return str(self.checkpoint((f"var_d{depth}.pth",)))

    def net(self, depth: int):
        """A fresh copy of the depth's VAR transformer (the master is built or loaded once, on the CPU)."""
        from varbench.variants.loading import load_var_net, random_var_net
        from varbench.variants.var_model import VARConfig

        if depth not in self._nets:
            self._nets[depth] = (random_var_net(VARConfig(depth=depth), seed=0) if self.ckpt_dir is None
                                 else load_var_net(self.weights_of(depth), depth))
        return copy.deepcopy(self._nets[depth])  # VAR casts and moves its modules in place

    def vae(self):
        from varbench.variants.loading import load_vqvae, random_vqvae
        from varbench.variants.vqvae import VQVAEConfig

        if self._vae is None:
            self._vae = (random_vqvae(VQVAEConfig(ch=self.sizes.vae_ch), seed=0) if self.ckpt_dir is None
                         else load_vqvae(self.checkpoint(VAE_FILES)))
        return copy.deepcopy(self._vae)

    def var(self, depth: int, engine, kv_policy=None, name: str | None = None, vae=None):
        """A VAR variant as `build_var` makes it, from the cached master weights."""
        from varbench.variants.var import VAR

        variant = VAR(self.net(depth), vae if vae is not None else self.vae(), engine, self.device,
                      name or f"var_d{depth}", kv_policy)
        variant.weights = self.weights_of(depth)
        if kv_policy is not None:
            kv_policy.prepare(variant)  # ScaleKV and HACK calibrate on this model
        return variant


# -- steps -------------------------------------------------------------------------------------------
def _engine(precision: str, **features: bool):
    from varbench.variants.engine import EngineConfig

    return EngineConfig(precision, **features)


def skipped(reason: str, **settings: Any) -> Outcome:
    return Outcome("skipped", {"skipped": f"skipped: {reason}"}, **settings)


def _bench(check: Check, variant, batch: int, repeats: int, kv_policy: str = "full") -> Outcome:
    metrics = bench_variant(variant, batch, SAMPLING, warmup=check.sizes.warmup, repeats=repeats)
    return Outcome("speed", metrics, variant.name, kv_policy, variant.engine.precision, to_dict(variant.engine),
                   batch, variant.weights)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def conformance_step(folder: Path) -> Callable[[Check], Outcome]:
    """Replays one fixture family with `varbench conformance FOLDER --device D` in a subprocess."""
    def run(check: Check) -> Outcome:
        # resolved: a family may read a sibling's files (hmar_d2 uses ../var_d2/vae.pth), also through a link
        cmd = [sys.executable, "-m", "varbench.harness.cli", "conformance", str(folder.resolve()), "--device",
               str(check.device)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=max(1.0, check.remaining()))
        settings = {"variant": folder.name, "precision": "fp32"}
        if proc.returncode == 2 and "unsupported fixture kind" in proc.stderr:
            return skipped(f"no conformance checker for {folder.name}: {proc.stderr.strip()}", **settings)
        if proc.returncode not in (0, 1):
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"conformance of {folder.name} exited {proc.returncode}: {last}\n"
                               f"command: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        report = json.loads(proc.stdout)
        failed = [c["check"] for c in report["checks"] if not c["pass"]]
        metrics = {"passed": report["passed"], "n_checks": len(report["checks"]), "n_failed": len(failed),
                   "failed": failed[:50], "checks": report["checks"]}
        return Outcome("conformance", metrics, **settings)
    return run


def kernel_attention_step(check: Check) -> Outcome:
    """The block-sparse attention kernel in bf16 at d16's shape (HMAR's Markov and VAR's block-causal
    ranges) against the torch reference in fp32."""
    from varbench.kernels import block_causal_ranges, block_sparse_attention, markov_ranges
    from varbench.variants.var_model import PATCH_NUMS

    if not check.cuda:
        return skipped("needs CUDA (Triton kernel)", variant="block_sparse_attention")
    gen = torch.Generator(device=check.device).manual_seed(0)
    heads, length = check.sizes.small, sum(p * p for p in PATCH_NUMS[680])
    q, k, v = (torch.randn(2, heads, length, 64, generator=gen, device=check.device) for _ in range(3))
    metrics = {}
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    for name, (start, end) in (("markov", markov_ranges(PATCH_NUMS[680])),
                               ("block_causal", block_causal_ranges(PATCH_NUMS[680]))):
        got, info = block_sparse_attention(q, k, v, start, end, impl="triton")
        # the reference sees the same bf16 inputs in fp32: the error is the kernel's own arithmetic
        want, _ = block_sparse_attention(q.float(), k.float(), v.float(), start, end, impl="ref")
        metrics[name] = {"max_abs_err": (got.float() - want).abs().max().item(), "impl": info["impl"],
                         "tiles_visited": info["tiles_visited"], "tiles_total": info["tiles_total"]}
    metrics["tol"] = 2e-2  # bf16 probabilities and output: a few 2^-9 relative on O(1) outputs
    metrics["pass"] = all(metrics[n]["max_abs_err"] <= metrics["tol"] for n in ("markov", "block_causal"))
    return Outcome("kernel", metrics, "block_sparse_attention")


def kernel_compact_step(check: Check) -> Outcome:
    """The in-place KV gather kernel in bf16 (every compressing KV policy) against torch.gather: exact."""
    from varbench.kernels import compact_kv_, compact_kv_ref_

    if not check.cuda:
        return skipped("needs CUDA (Triton kernel)", variant="compact_kv_")
    gen = torch.Generator(device=check.device).manual_seed(0)
    shape = (2, check.sizes.small, 680, 64)
    k, v = (torch.randn(shape, generator=gen, device=check.device).bfloat16() for _ in range(2))
    keep = torch.rand(shape[:3], generator=gen, device=check.device).argsort(-1)[..., :68].sort(-1).values
    k_ref, v_ref = k.clone(), v.clone()
    info = compact_kv_(k, v, keep, impl="triton")
    compact_kv_ref_(k_ref, v_ref, keep)
    same = bool(torch.equal(k[..., :68, :], k_ref[..., :68, :]) and torch.equal(v[..., :68, :], v_ref[..., :68, :]))
    return Outcome("kernel", {"impl": info["impl"], "n_keep": info["n_keep"], "pass": same}, "compact_kv_")


def bench_step(depth_of: Callable[[Sizes], int], batch_of: Callable[[Sizes], int], reference: bool = False,
               **features: bool) -> Callable[[Check], Outcome]:
    """`varbench bench` of one VAR at one batch size and engine setting; CUDA-only features skip on the CPU."""
    def run(check: Check) -> Outcome:
        from varbench.variants.engine import EngineConfig

        depth, batch, precision = depth_of(check.sizes), batch_of(check.sizes), check.sizes.precision
        engine = EngineConfig.reference(precision) if reference else _engine(precision, **features)
        if not check.cuda and (engine.compile or engine.cuda_graphs):
            on = " and ".join(f for f in ("compile", "cuda_graphs") if getattr(engine, f))
            return skipped(f"needs CUDA ({on} is measured on the GPU only)", variant=f"var_d{depth}",
                         precision=precision, engine=to_dict(engine), batch_size=batch)
        return _bench(check, check.var(depth, engine), batch, check.sizes.repeats)
    return run


def reference_step(check: Check) -> Outcome:
    """d16 at batch 64 in bf16 through the reference loop (every engine feature off); speedup of the engine."""
    out = bench_step(lambda s: s.small, lambda s: s.batch, reference=True)(check)
    engine = check.results.get("bench:d16_b64_bf16")
    if engine is not None:
        out.metrics["speedup_engine_vs_reference"] = engine["images_per_s"] / out.metrics["images_per_s"]
    return out


def numerics_step(check: Check) -> Outcome:
    """Greedy generation through the engine and through the reference loop on the same seed: token agreement
    and image error in fp32 (should agree) and in bf16 (how far the engine's low precision moves tokens)."""
    from varbench.harness.core.loop import generate
    from varbench.variants.engine import EngineConfig

    depth, batch = check.sizes.small, check.sizes.greedy_batch
    labels = torch.arange(batch, device=check.device) * 7
    metrics: dict[str, Any] = {}
    for precision in check.sizes.numerics:
        runs = [generate(check.var(depth, e), labels, GREEDY, g_seed=0)
                for e in (EngineConfig(precision), EngineConfig.reference(precision))]
        total = sum(t.numel() for t in runs[1].tokens)
        same = sum(int((a == b).sum()) for a, b in zip(runs[0].tokens, runs[1].tokens))
        first = next((si for si, (a, b) in enumerate(zip(*(r.tokens for r in runs))) if not torch.equal(a, b)), None)
        metrics[precision] = {"token_agreement": same / total, "first_differing_scale": first,
                              "image_max_abs_err": (runs[0].images - runs[1].images).abs().max().item()}
    return Outcome("numerics", metrics, f"var_d{depth}", precision="+".join(check.sizes.numerics), batch_size=batch,
                   weights=check.weights_of(depth))


def kv_step(policy_name: str) -> Callable[[Check], Outcome]:
    """One KV policy on d16 at batch 64 in bf16: KV bytes per scale and the allocator's peak."""
    def run(check: Check) -> Outcome:
        from varbench.harness.core.registry import KV_POLICIES

        policy = KV_POLICIES.get(policy_name)()
        variant = check.var(check.sizes.small, _engine(check.sizes.precision), kv_policy=policy)
        out = _bench(check, variant, check.sizes.batch, check.sizes.kv_repeats, policy_name)
        out.metrics |= policy.record()
        return out
    return run


def code_step(check: Check) -> Outcome:
    """CoDe: d30 drafts the first N = 8 scales, d16 refines the rest (one shared VQVAE); speedup over d30."""
    from varbench.variants.code import CoDe

    s = check.sizes
    engine = _engine(s.precision)
    drafter = check.var(s.large, engine, name=f"drafter_d{s.large}")
    refiner = check.var(s.small, engine, name=f"refiner_d{s.small}", vae=drafter.vae)
    variant = CoDe(drafter, refiner, CODE_DRAFT_STEPS, f"code_d{s.large}_d{s.small}")
    out = _bench(check, variant, s.batch, s.repeats)
    d30 = check.results.get("bench:d30_b64_bf16")
    if d30 is not None:
        out.metrics["speedup_vs_d30"] = out.metrics["images_per_s"] / d30["images_per_s"]
    out.metrics["draft_steps"] = CODE_DRAFT_STEPS
    return out


def hmar_step(check: Check) -> Outcome:
    """HMAR d16 at batch 64 in bf16 (its Markov attention goes through the Triton kernel on CUDA)."""
    from varbench.harness.core.registry import create_variant

    s = check.sizes
    kwargs: dict[str, Any] = {"engine": _engine(s.precision), "device": str(check.device), "vae_ch": s.vae_ch}
    if check.ckpt_dir is None:
        kwargs |= {"weights": "random", "n_layers_train": s.hmar_layers_train}
    else:
        kwargs |= {"weights": str(check.checkpoint((f"hmar-d{s.small}.pth", f"hmar_d{s.small}.pth"))),
                   "vae": str(check.checkpoint(VAE_FILES))}
    if s.small == 16:
        variant = create_variant("hmar_d16", **kwargs)
    else:
        variant = create_variant("test_hmar", **kwargs)
    return _bench(check, variant, s.batch, s.repeats)


def _fixture_folders(fixtures: Path | None) -> list[Path]:
    if fixtures is None or not fixtures.is_dir():
        return []
    return sorted(p for p in fixtures.iterdir() if (p / "meta.json").is_file())


def plan_steps(check: Check) -> list[Step]:
    """Every step in run order: conformance (subprocesses), the engine's paths, then the steps that run the
    project's Triton kernels last, since a faulting kernel can leave the CUDA context unusable for what follows.
    Names say the real sizes (d16, d30, b64); a dry run measures the tiny stand-ins under the same names."""
    small, large, big = (lambda s: s.small), (lambda s: s.large), (lambda s: s.batch)
    one = lambda s: 1
    steps = [Step(f"conformance:{f.name}", conformance_step(f), 15) for f in _fixture_folders(check.fixtures)]
    steps += [
        Step("bench:d16_b1_bf16_eager", bench_step(small, one), 25),  # includes building the d16 weights
        Step("bench:d16_b1_bf16_cuda_graphs", bench_step(small, one, cuda_graphs=True), 15),
        Step("bench:d16_b1_bf16_compile", bench_step(small, one, compile=True), 80),
        Step("bench:d16_b1_bf16_compile_cuda_graphs", bench_step(small, one, compile=True, cuda_graphs=True), 40),
        Step("bench:d16_b64_bf16", bench_step(small, big), 15),
        Step("reference:d16_b64_bf16", reference_step, 15),
        Step("numerics:d16_engine_vs_reference", numerics_step, 10),
        Step("bench:d30_b64_bf16", bench_step(large, big), 55),  # includes building the d30 weights
        Step(f"code:d30_d16_N{CODE_DRAFT_STEPS}_b64_bf16", code_step, 25),
        Step("kernel:block_sparse_attention_bf16", kernel_attention_step, 10),
        Step("kernel:compact_kv_bf16", kernel_compact_step, 5),
        Step("hmar:d16_b64_bf16", hmar_step, 25),  # its Markov attention: the block-sparse kernel
    ]
    import varbench.variants  # noqa: F401  (registers the KV policies)
    from varbench.harness.core.registry import KV_POLICIES

    steps += [Step(f"kv:{name}_d16_b64_bf16", kv_step(name), 10) for name in KV_POLICIES.list()]
    return steps
