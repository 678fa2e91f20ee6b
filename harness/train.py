"""Training loop for the small 64 px zoo: the VQVAE tokenizer, VAR transformers and the ProjectCNN classifier.

    python -m varbench.harness.train {vqvae,var,classifier} --out DIR --steps N [--depth D] [--resume]
    torchrun --standalone --nproc_per_node 2 -m varbench.harness.train var --out DIR --steps N --vqvae V.pt

What it does (model-specific losses live in `varbench.variants.training`):
* AdamW (no weight decay on biases, gains, embeddings and position tensors), linear warm-up then cosine (or
  linear) decay to `min_lr_ratio`·lr, gradient-norm clipping.
* Data: the synthetic set (`harness.synthetic`) of `num_train` images; step s draws its batch indices (and
  VAR's label-dropout coins) from generators seeded by (seed, s, rank) alone, so a run's data never depend on
  how it was interrupted. A disjoint held-out split (global indices from `HELDOUT_START`) is scored at the end.
* Every `ckpt_every` steps (and at the end / at `stop_at`) rank 0 writes, atomically (tmp file, fsync,
  rename), `out/last.pt` (model, optimizer, scheduler, step, RNG states, config) and `out/model.pt` (the bare
  state dict in the official layout, loadable with `varbench.variants.loading` / `ProjectCNN.load`).
  `--resume` continues from `last.pt` and reproduces the uninterrupted run's losses exactly (same threads).
* `out/log.jsonl`: one JSON line per `log_every` steps (mean loss and model metrics over the interval, lr,
  grad norm, steps/s); `out/summary.json`: held-out metrics, parameter count, timing.
* Under torchrun the process group is joined through `harness.shard.init_distributed` (gloo on CPU, NCCL on
  CUDA); the model is wrapped in DistributedDataParallel and each rank takes every world-th sample of the
  global batch. tqdm progress is shown on rank 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .shard import barrier, init_distributed
from .synthetic import make_dataset

__all__ = ["KINDS", "TrainConfig", "HELDOUT_START", "train", "lr_factor", "load_checkpoint", "main"]

KINDS = ("vqvae", "var", "classifier")
HELDOUT_START = 1_000_000  # global image index of the held-out split (training uses [0, num_train))
_DEFAULT_LR = {"vqvae": 1e-3, "var": 1e-3, "classifier": 1e-3}
_SEED_STRIDE = 1_000_003
CHECKPOINT, WEIGHTS, LOG, SUMMARY = "last.pt", "model.pt", "log.jsonl", "summary.json"
# Settings a resumed run must share with the checkpoint (everything that changes the step sequence).
_RESUME_KEYS = ("kind", "preset", "depth", "steps", "batch_size", "lr", "weight_decay", "beta1", "beta2",
                "warmup_steps", "min_lr_ratio", "schedule", "grad_clip", "seed", "data_seed", "num_train",
                "cond_drop", "vqvae")


@dataclass
class TrainConfig:
    kind: str
    out: str
    steps: int
    depth: int = 2  # VAR only
    preset: str = "zoo"  # model sizes: 'zoo' or 'tiny' (tests)
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
    cond_drop: float = 0.1  # VAR label dropout (null class = num_classes)
    vqvae: str = ""  # VAR: the trained tokenizer's model.pt; '' = a seeded random one (tests only)
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
            or "ada_gss" in name or "scale_mul" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _step_generator(cfg: TrainConfig, step: int, rank: int = -1) -> torch.Generator:
    """A generator determined by (seed, step, rank) only: rank -1 = shared by all ranks (batch indices)."""
    return torch.Generator().manual_seed((cfg.seed * _SEED_STRIDE + step) * 1024 + rank + 1)


class _StepModule(nn.Module):
    """Puts a model's whole training loss inside one forward, so that DDP sees every parameter's use."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., tuple[Tensor, dict[str, float]]]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *batch: Any) -> tuple[Tensor, dict[str, float]]:
        return self.loss_fn(self.model, *batch)


@dataclass
class _Task:
    model: nn.Module  # trained and exported
    loss_fn: Callable[..., tuple[Tensor, dict[str, float]]]  # (model, *batch) -> (loss, metrics)
    batch: Callable[[Tensor, int], tuple[Any, ...]]  # (indices, step) -> this rank's batch
    evaluate: Callable[[], dict[str, float]]
    info: dict[str, Any]


def _images(cfg: TrainConfig, heldout: bool) -> tuple[Tensor, Tensor]:
    n, start = (cfg.num_heldout, HELDOUT_START) if heldout else (cfg.num_train, 0)
    images, labels = make_dataset(n, seed=cfg.data_seed, size=64, start=start)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _batched(fn: Callable[[slice], None], n: int, size: int = 128) -> None:
    for lo in range(0, n, size):
        fn(slice(lo, min(n, lo + size)))


def _build_task(cfg: TrainConfig, rank: int, world: int) -> _Task:
    from varbench.variants import training as T

    sizes = T.sizes(cfg.preset)
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = _images(cfg, heldout=False)
    held_images, held_labels = _images(cfg, heldout=True)

    def shard(x: Tensor) -> Tensor:
        return x[rank::world].to(device)

    if cfg.kind == "classifier":
        from .extractors import ProjectCNN

        model = ProjectCNN(sizes.num_classes).reset_parameters_deterministic(cfg.seed)

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            model.eval()
            correct = torch.zeros(())

            def score(sl: slice) -> None:
                logits = model(held_images[sl].permute(0, 3, 1, 2).contiguous().to(device))
                correct.add_((logits.argmax(-1).cpu() == held_labels[sl]).sum())
            _batched(score, len(held_labels))
            model.train()
            return {"heldout_acc": correct.item() / len(held_labels), "chance": 1 / sizes.num_classes}

        return _Task(model, T.classifier_step, lambda idx, step: (shard(images[idx]), shard(labels[idx])),
                     evaluate, {"num_classes": sizes.num_classes})

    if cfg.kind == "vqvae":
        from varbench.variants.vqvae import VQVAE

        model = T.init_vqvae_(VQVAE(sizes.vqvae), gen)
        pn = sizes.patch_nums

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            model.eval()
            err, used = torch.zeros(()), torch.zeros(sizes.vqvae.vocab_size, dtype=torch.bool)

            def score(sl: slice) -> None:  # the inference path: tokens -> f_hat -> decode
                x = T.images_to_tensor(held_images[sl]).to(device)
                tokens = model.encode_tokens(x, pn)
                recon = model.decode(model.tokens_to_fhat(tokens, pn))
                err.add_((recon - x).square().mean(dim=(1, 2, 3)).sum().cpu())
                for t in tokens:
                    used[t.flatten().cpu()] = True
            _batched(score, len(held_labels))
            model.train()
            mse = err.item() / len(held_labels)
            return {"heldout_mse": mse, "heldout_psnr": 10 * math.log10(4 / mse), "code_usage": used.float().mean().item()}

        return _Task(model, lambda m, x: T.vqvae_step(m, x, pn), lambda idx, step: (shard(images[idx]),),
                     evaluate, {"vqvae_config": asdict(sizes.vqvae), "patch_nums": list(pn)})

    # VAR: a frozen tokenizer turns the data set into token pyramids once.
    from varbench.variants.loading import load_vqvae
    from varbench.variants.var_model import VARNet
    from varbench.variants.vqvae import VQVAE

    if cfg.vqvae:
        vae = load_vqvae(cfg.vqvae).float()
        if vae.cfg.vocab_size != sizes.vqvae.vocab_size or vae.cfg.z_channels != sizes.vqvae.z_channels:
            raise ValueError(f"{cfg.vqvae} (vocab {vae.cfg.vocab_size}, Cvae {vae.cfg.z_channels}) does not fit "
                             f"preset {cfg.preset!r} (vocab {sizes.vqvae.vocab_size}, Cvae {sizes.vqvae.z_channels})")
    else:
        vae = T.init_vqvae_(VQVAE(sizes.vqvae), torch.Generator().manual_seed(cfg.seed + 1))
    vae = vae.to(device).eval().requires_grad_(False)
    var_cfg = T.var_config(cfg.preset, cfg.depth)
    pn = var_cfg.patch_nums
    ends = np.cumsum([p * p for p in pn])[:-1].tolist()

    @torch.no_grad()
    def tokenize(imgs: Tensor) -> Tensor:
        out = torch.empty(len(imgs), var_cfg.seq_len, dtype=torch.long)

        def enc(sl: slice) -> None:
            out[sl] = torch.cat(vae.encode_tokens(T.images_to_tensor(imgs[sl]).to(device), pn), dim=1).cpu()
        _batched(enc, len(imgs))
        return out

    tokens, held_tokens = tokenize(images), tokenize(held_images)
    model = T.init_var_(VARNet(var_cfg), gen)

    def batch(idx: Tensor, step: int) -> tuple[Any, ...]:
        coins = _step_generator(cfg, step, rank)
        return (shard(tokens[idx]), shard(labels[idx]), coins)

    def loss_fn(m: nn.Module, tok: Tensor, lab: Tensor, coins: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return T.var_step(m, vae, list(tok.tensor_split(ends, dim=1)), lab, cfg.cond_drop, coins)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        ce, acc = torch.zeros(()), torch.zeros(())

        def score(sl: slice) -> None:
            loss, m = T.var_step(model, vae, list(held_tokens[sl].to(device).tensor_split(ends, dim=1)),
                                 held_labels[sl].to(device), 0.0, None)
            ce.add_(loss.cpu() * (sl.stop - sl.start))
            acc.add_(m["acc"] * (sl.stop - sl.start))
        _batched(score, len(held_labels), 64)
        model.train()
        return {"heldout_ce": ce.item() / len(held_labels), "heldout_acc": acc.item() / len(held_labels),
                "uniform_ce": math.log(var_cfg.vocab_size)}

    return _Task(model, loss_fn, batch, evaluate,
                 {"var_config": asdict(var_cfg), "vqvae": cfg.vqvae or f"random (seed {cfg.seed + 1})"})


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


def _save(out: Path, cfg: TrainConfig, task: _Task, opt: torch.optim.Optimizer, sched: Any, step: int) -> None:
    sd = task.model.state_dict()
    _atomic_save({"kind": cfg.kind, "config": asdict(cfg), "info": task.info, "step": step, "model": sd,
                  "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state()},
                 out / CHECKPOINT)
    _atomic_save(sd, out / WEIGHTS)


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = asdict(cfg)
    diff = [f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}" for k in _RESUME_KEYS if saved.get(k) != now[k]]
    if diff:
        raise ValueError("cannot resume: the run's settings differ from the checkpoint's\n  " + "\n  ".join(diff))


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

    task = _build_task(cfg, rank, world)
    model = task.model.to(cfg.device).train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    start = 0
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        _check_resumable(state["config"], cfg)
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

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.kind}", unit="step", leave=False,
               disable=not (cfg.progress and rank == 0))
    acc: dict[str, float] = {}
    count, t_interval, t_start, grad_norm = 0, time.perf_counter(), time.perf_counter(), 0.0
    step = start
    for step in range(start, end):
        idx = torch.randint(cfg.num_train, (cfg.batch_size,), generator=_step_generator(cfg, step))
        loss, metrics = runner(*task.batch(idx, step))
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
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
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


# -- command line -----------------------------------------------------------------------------------------

def _parse(argv: Sequence[str] | None) -> tuple[TrainConfig, bool]:
    ap = argparse.ArgumentParser(prog="python -m varbench.harness.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    skip = {"kind", "out", "steps", "progress"}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default)
    ns = vars(ap.parse_args(argv))
    resume = ns.pop("resume")
    return TrainConfig(**ns), resume


def main(argv: Sequence[str] | None = None) -> int:
    cfg, resume = _parse(argv)
    summary = train(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
