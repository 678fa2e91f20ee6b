"""Training loop for the VQVAE tokenizer, VAR and HMAR transformers, CoDe-style refiners and the ProjectCNN
classifier: the small 64 px zoo on the synthetic set, or real sizes on an ImageNet-style folder (`--data`).

    python -m varbench.harness.train {vqvae,var,hmar,classifier} --out DIR --steps N [--depth D] [--resume]
    python -m varbench.harness.train vqvae-decoder --vqvae V.pt --out DIR --steps N  # decoder only, tokens kept
    torchrun --standalone --nproc_per_node 2 -m varbench.harness.train var --out DIR --steps N --vqvae V.pt
    python -m varbench.harness.train var --from-scale 5 --init VAR/model.pt ...       # a CoDe-style refiner
    python -m varbench.harness.train hmar --stage 1 --out H1 ...                       # next-scale path
    python -m varbench.harness.train hmar --stage 2 --init H1/model.pt --out H2 ...    # masked path
    torchrun --nproc_per_node 8 -m varbench.harness.train var --preset imagenet256 --depth 16 \
        --data /path/to/imagenet --vqvae vae_ch160v4096z32.pth --workers 8 ...       # ImageNet (README)

What it does (per-kind models, batches and held-out metrics live in `harness.train_tasks`, model-specific losses
in `varbench.harness.train.steps`):
* AdamW (no weight decay on biases, gains, embeddings and position tensors), linear warm-up then cosine (or
  linear) decay to `min_lr_ratio`·lr, gradient-norm clipping.
* Data (`harness.train_data`): by default the synthetic set (`harness.synthetic`) of `num_train` images, held
  in memory (VAR and HMAR tokenise it once up front). With `--data PATH`, an ImageNet-style folder
  (`PATH/train/<class>/*.png|jpg|jpeg|webp`, optional `PATH/val/<class>/...`; class index = sorted position of
  the directory name) streamed through a DataLoader with `--workers` processes, at the preset's image size with
  VAR's transform (shorter side to 1.125·size, LANCZOS; random crop, center crop for val; no flip), walked in
  epochs; VAR and HMAR tokenise each batch with the frozen VQVAE.
  Step s's batch indices, crops, label-dropout coins and HMAR's masks come from generators seeded by
  (seed, s, rank) alone, so a run's data never depend on how it was interrupted. The held-out split (synthetic:
  global indices from `HELDOUT_START`; folder: val/, or none, as summary.json says) is scored at the end.
* Every `ckpt_every` steps (and at the end / at `stop_at`) rank 0 writes, atomically (tmp file, fsync,
  rename), `out/last.pt` (model, optimizer, scheduler, step, RNG states, config) and `out/model.pt` (the bare
  state dict in the official layout, loadable with `varbench.variants.loading`, `variants.hmar.load_hmar_net`
  or `ProjectCNN.load`).
  `--resume` continues from `last.pt` and reproduces the uninterrupted run's losses exactly (same threads).
* `out/log.jsonl`: one JSON line per `log_every` steps (mean loss and model metrics over the interval, lr,
  grad norm, steps/s); `out/summary.json`: held-out metrics, parameter count, timing.
* Under torchrun the process group is joined through `harness.shard.init_distributed` (gloo on CPU, NCCL on
  CUDA); the model is wrapped in DistributedDataParallel and each rank takes every world-th sample of the
  global batch. tqdm progress is shown on rank 0.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from varbench.harness.run.shard import barrier, init_distributed
from .progress import bar as progress_bar
from .tasks import HELDOUT_START, Task, build_task

__all__ = ["KINDS", "TrainConfig", "HELDOUT_START", "train", "lr_factor", "load_checkpoint"]

KINDS = ("vqvae", "vqvae-decoder", "var", "hmar", "classifier")
_DEFAULT_LR = {"vqvae": 1e-3, "vqvae-decoder": 3e-4, "var": 1e-3, "hmar": 1e-3, "classifier": 1e-3}
CHECKPOINT, WEIGHTS, LOG, SUMMARY = "last.pt", "model.pt", "log.jsonl", "summary.json"
# Settings a resumed run must share with the checkpoint (everything that changes the step sequence).
_RESUME_KEYS = ("kind", "preset", "depth", "steps", "batch_size", "lr", "weight_decay", "beta1", "beta2",
                "warmup_steps", "min_lr_ratio", "schedule", "grad_clip", "seed", "data_seed", "num_train",
                "cond_drop", "vqvae", "init", "from_scale", "stage", "scale_weights", "data")
_RESUME_DATA_KEYS = ("data_classes", "data_train_images")  # a --data folder must not have changed either


@dataclass
class TrainConfig:
    kind: str
    out: str
    steps: int
    depth: int = 2  # VAR and HMAR
    preset: str = "zoo"  # model sizes: 'zoo', 'tiny' (tests) or 'imagenet256' (variants.training)
    batch_size: int = 32  # global batch (split over ranks)
    lr: float = 0.0  # 0: the kind's default
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = -1  # -1: steps // 50 (VAR's warm-up of ep/50), at least 1
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # or 'linear'
    grad_clip: float = 2.0  # 0: off
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0  # init, batch order, label dropout
    data_seed: int = 0  # synthetic data set seed
    num_train: int = 10_000
    num_heldout: int = 500
    data: str = ""  # '' = the synthetic set; else an ImageNet-style folder PATH/train/<class>/... (+ PATH/val/)
    workers: int = 0  # DataLoader worker processes for `data` (0: load in the training process)
    cond_drop: float = 0.1  # VAR label dropout (null class = num_classes)
    vqvae: str = ""  # VAR, HMAR: the trained tokenizer's model.pt; '' = a seeded random one (tests only)
    init: str = ""  # VAR, HMAR: start from this model.pt instead of the from-scratch init (HMAR: HMAR or VAR layout)
    from_scale: int = 0  # VAR: loss only on the tokens of scales >= from_scale (a CoDe-style refiner); 0 = all
    stage: int = 1  # HMAR: 1 = next-scale path, 2 = masked path (needs init = a stage-1 model.pt)
    scale_weights: str = "lognormal"  # HMAR stage 1 per-token loss weights: 'lognormal' (HMAR's) or 'uniform'
    device: str = "cpu"
    threads: int = 0  # 0: leave torch's default
    progress: bool = True
    stop_at: int = 0  # stop (with a checkpoint) after this step although `steps` is the schedule's length

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {self.schedule!r}")
        if self.init and self.kind not in ("var", "hmar"):
            raise ValueError(f"init applies to kinds var and hmar, not {self.kind!r}")
        if self.from_scale and self.kind != "var":
            raise ValueError(f"from_scale applies to kind var only, not {self.kind!r}")
        if self.from_scale < 0:
            raise ValueError(f"from_scale must be >= 0, got {self.from_scale}")
        if self.stage not in (1, 2) or (self.stage == 2 and self.kind != "hmar"):
            raise ValueError(f"stage must be 1, or 2 for kind hmar; got stage {self.stage} for {self.kind!r}")
        if self.stage == 2 and not self.init:
            raise ValueError("HMAR stage 2 starts from a trained stage-1 model: pass init (--init PATH/model.pt)")
        if self.workers < 0 or (self.workers and not self.data):
            raise ValueError(f"workers must be >= 0 and applies to --data only, got {self.workers}")
        if self.scale_weights not in ("lognormal", "uniform"):
            raise ValueError(f"scale_weights must be 'lognormal' or 'uniform', got {self.scale_weights!r}")
        if self.kind == "vqvae-decoder" and not self.vqvae:
            raise ValueError("vqvae-decoder fine-tunes a trained tokenizer's decoder: pass vqvae (--vqvae PATH)")
        self.lr = self.lr or _DEFAULT_LR[self.kind]
        if self.warmup_steps < 0:
            self.warmup_steps = max(1, self.steps // 50)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then cosine/linear decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay only on matrices/conv kernels, not on biases, gains, embeddings or position tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.startswith(("pos_", "class_emb", "lvl_embed")) or "embedding" in name \
            or "ada_gss" in name or "scale_mul" in name or name.startswith("mask_embed")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _StepModule(nn.Module):
    """Puts a model's whole training loss inside one forward, so that DDP sees every parameter's use."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., tuple[Tensor, dict[str, float]]]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *batch: Any) -> tuple[Tensor, dict[str, float]]:
        return self.loss_fn(self.model, *batch)


# -- checkpoints ------------------------------------------------------------------------------------------

def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a `last.pt` training state (tensors and plain Python values only: weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _save(out: Path, cfg: TrainConfig, task: Task, opt: torch.optim.Optimizer, sched: Any, step: int) -> None:
    sd = task.model.state_dict()
    _atomic_save({"kind": cfg.kind, "config": asdict(cfg), "info": task.info, "step": step, "model": sd,
                  "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state()},
                 out / CHECKPOINT)
    _atomic_save(sd, out / WEIGHTS)


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = asdict(cfg)
    default = {f.name: f.default for f in fields(TrainConfig)}  # checkpoints older than a setting used its default
    diff = [f"{k}: checkpoint {saved.get(k, default[k])!r} vs now {now[k]!r}" for k in _RESUME_KEYS
            if saved.get(k, default[k]) != now[k]]
    if diff:
        raise ValueError("cannot resume: the run's settings differ from the checkpoint's\n  " + "\n  ".join(diff))


def _check_same_data(saved: dict[str, Any], now: dict[str, Any]) -> None:
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in _RESUME_DATA_KEYS
            if saved.get(k) != now.get(k)]
    if diff:
        raise ValueError("cannot resume: the data folder changed since the checkpoint\n  " + "\n  ".join(diff))


def _read_log(path: Path, upto: int) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= upto]


# -- the loop ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Runs (or resumes) one training job; returns the summary (also written to out/summary.json on rank 0)."""
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, resume)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, resume: bool) -> dict[str, Any]:
    rank, world = init_distributed(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} ranks")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)

    task = build_task(cfg, rank, world)
    model = task.model.to(cfg.device).train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    start = 0
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        _check_resumable(state["config"], cfg)
        _check_same_data(state["info"], task.info)
        model.load_state_dict(state["model"], strict=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = int(state["step"])
    log_lines = _read_log(out / LOG, start) if resume else []
    if rank == 0:
        (out / LOG).write_text("".join(line + "\n" for line in log_lines))

    step_module = _StepModule(model, task.loss_fn)
    runner: nn.Module = step_module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(step_module, device_ids=None if cfg.device == "cpu" else [cfg.device])
    params = [p for g in opt.param_groups for p in g["params"]]
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps

    bar = progress_bar(cfg.steps, f"train {cfg.kind}", "step", cfg.progress and rank == 0, initial=start)
    acc: dict[str, float] = {}
    count, t_interval, t_start, grad_norm = 0, time.perf_counter(), time.perf_counter(), 0.0
    step = start
    for step, (x, labels) in zip(range(start, end), task.data.batches(start, end)):
        loss, metrics = runner(*task.batch(x, labels, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        sched.step()
        for k, v in {"loss": loss.item(), **metrics}.items():
            acc[k] = acc.get(k, 0.0) + v
        count += 1
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            values = torch.tensor([acc[k] / count for k in sorted(acc)], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(values)
                values /= world
            now = time.perf_counter()
            entry = {"step": done, **dict(zip(sorted(acc), values.tolist())), "lr": opt.param_groups[0]["lr"],
                     "grad_norm": grad_norm, "steps_per_s": count / max(now - t_interval, 1e-9)}
            if rank == 0:
                with open(out / LOG, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                bar.set_postfix(loss=f"{entry['loss']:.4f}", refresh=False)  # drawn at its own pace
            acc, count, t_interval = {}, 0, now
        if done % cfg.ckpt_every == 0 or done == end:
            if rank == 0:
                _save(out, cfg, task, opt, sched, done)
            barrier()
    bar.close()
    elapsed = time.perf_counter() - t_start
    summary: dict[str, Any] = {"kind": cfg.kind, "step": end, "steps_total": cfg.steps,
                               "finished": end >= cfg.steps, "world_size": world,
                               "params": sum(p.numel() for p in model.parameters()),
                               "steps_this_run": end - start,
                               "steps_per_s": (end - start) / elapsed if end > start else float("nan"),
                               **task.info}
    if end >= cfg.steps and rank == 0:
        summary.update(task.evaluate())
    if rank == 0:
        (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    barrier()
    return summary
