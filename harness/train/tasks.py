"""What each kind of `varbench.harness.train` trains: its model, batches, loss and held-out metrics.

The loop in `harness.train` is generic; a `Task` is everything it needs to know about one kind. The losses
themselves live in `varbench.harness.train.steps`. Kinds:

* `classifier`, `vqvae`: images straight from the data (the synthetic set, or `--data`'s folder).
* `var`, `hmar`: a frozen tokenizer (`vqvae`, or a seeded random one for tests) turns the synthetic set into token
  pyramids once (what the zoo build measures); a `--data` folder is too large for that, so each batch is
  tokenised as it arrives. Steps draw label-dropout coins (and HMAR's masks) from a generator seeded by
  (seed, step, rank).
  `var` with `from_scale` N > 0 is a CoDe-style refiner (loss on scales ≥ N), usually with `init` a trained VAR.
  `hmar` stage 1 trains the next-scale network, stage 2 (`init` = a stage-1 model.pt) the masked path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from varbench.harness.eval.synthetic import make_dataset
from .data import FolderData, MemoryData, scan_folder
from .progress import bar

if TYPE_CHECKING:
    from .steps import ModelSizes

    from .trainer import TrainConfig

__all__ = ["HELDOUT_START", "Task", "build_task", "step_generator"]

HELDOUT_START = 1_000_000  # global image index of the held-out split (training uses [0, num_train))
_SEED_STRIDE = 1_000_003
_EVAL_MASK_SEED = 12345  # held-out masks: one fixed stream, so stage-2 scores are comparable between runs


Data = MemoryData | FolderData  # .batches(start, end): this rank's (x, labels) per step; .heldout(size)


@dataclass
class Task:
    model: nn.Module  # trained and exported
    loss_fn: Callable[..., tuple[Tensor, dict[str, float]]]  # (model, *batch) -> (loss, metrics)
    batch: Callable[[Tensor, Tensor, int], tuple[Any, ...]]  # (this rank's x, labels, step) -> loss_fn's batch
    evaluate: Callable[[], dict[str, float]]
    info: dict[str, Any]
    data: Data


def step_generator(cfg: TrainConfig, step: int, rank: int = -1) -> torch.Generator:
    """A generator determined by (seed, step, rank) only: rank -1 = shared by all ranks (batch indices)."""
    return torch.Generator().manual_seed((cfg.seed * _SEED_STRIDE + step) * 1024 + rank + 1)


def _images(cfg: TrainConfig, heldout: bool, progress: bool = False) -> tuple[Tensor, Tensor]:
    """The synthetic split, rendered in chunks (image i depends on its global index only, so chunks change
    nothing) to show progress: 10,000 images take several seconds on a CPU."""
    n, start = (cfg.num_heldout, HELDOUT_START) if heldout else (cfg.num_train, 0)
    images, labels = np.empty((n, 64, 64, 3), np.uint8), np.empty(n, np.int64)
    with bar(n, f"render {'held-out' if heldout else 'training'} images", "img", progress) as shown:
        def render(sl: slice) -> None:
            images[sl], labels[sl] = make_dataset(sl.stop - sl.start, seed=cfg.data_seed, size=64,
                                                  start=start + sl.start)
            shown.update(sl.stop - sl.start)
        _batched(render, n, 1000)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _batched(fn: Callable[[slice], None], n: int, size: int = 128) -> None:
    for lo in range(0, n, size):
        fn(slice(lo, min(n, lo + size)))


def _synthetic_indices(cfg: TrainConfig) -> Callable[[int], Tensor]:
    """Step s's global batch of the synthetic set: uniform draws with replacement from a (seed, s) generator."""
    return lambda step: torch.randint(cfg.num_train, (cfg.batch_size,), generator=step_generator(cfg, step))


def _data(cfg: TrainConfig, sizes: ModelSizes, rank: int, world: int) -> tuple[Data, dict[str, Any]]:
    """The images and what the summary says about them: the synthetic set in memory, or the --data folder."""
    if not cfg.data:
        progress = cfg.progress and rank == 0
        images, labels = _images(cfg, heldout=False, progress=progress)
        held_images, held_labels = _images(cfg, heldout=True, progress=progress)
        return MemoryData(images, labels, held_images, held_labels, _synthetic_indices(cfg), rank, world), {}
    index = scan_folder(cfg.data)
    if len(index.classes) > sizes.num_classes:
        raise ValueError(f"{cfg.data}/train has {len(index.classes)} class directories, but preset {cfg.preset!r} "
                         f"has {sizes.num_classes} classes")
    data = FolderData(index, sizes.image_size, cfg.seed, cfg.batch_size, cfg.workers, rank, world,
                      pin_memory=torch.device(cfg.device).type == "cuda")
    return data, data.info(cfg.steps)


def build_task(cfg: TrainConfig, rank: int, world: int) -> Task:
    from . import steps as T

    sizes = T.sizes(cfg.preset)
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    data, data_info = _data(cfg, sizes, rank, world)
    if cfg.kind == "vqvae-decoder":  # a trained tokenizer's decoder, its tokens frozen (harness/train/decoder.py)
        from .decoder import decoder_task

        return decoder_task(cfg, _tokenizer(cfg, sizes, device), data, data_info, device, cfg.progress and rank == 0)

    def images_labels(x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor]:
        return x.to(device), y.to(device)

    if cfg.kind == "classifier":
        from varbench.harness.eval.extractors import ProjectCNN

        model = ProjectCNN(sizes.num_classes).reset_parameters_deterministic(cfg.seed)

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            if not data.held_count:
                return {}
            model.eval()
            correct = torch.zeros(())
            for x, y in data.heldout(128):
                logits = model(x.permute(0, 3, 1, 2).contiguous().to(device))
                correct.add_((logits.argmax(-1).cpu() == y).sum())
            model.train()
            return {"heldout_acc": correct.item() / data.held_count, "chance": 1 / sizes.num_classes}

        return Task(model, T.classifier_step, images_labels, evaluate,
                    {"num_classes": sizes.num_classes, **data_info}, data)

    if cfg.kind == "vqvae":
        from varbench.variants.vqvae import VQVAE

        model = T.init_vqvae_(VQVAE(sizes.vqvae), gen)
        pn = sizes.patch_nums

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            if not data.held_count:
                return {}
            model.eval()
            err, used = torch.zeros(()), torch.zeros(sizes.vqvae.vocab_size, dtype=torch.bool)
            for images, _ in data.heldout(128):  # the inference path: tokens -> f_hat -> decode
                x = T.images_to_tensor(images).to(device)
                tokens = model.encode_tokens(x, pn)
                recon = model.decode(model.tokens_to_fhat(tokens, pn))
                err.add_((recon - x).square().mean(dim=(1, 2, 3)).sum().cpu())
                for t in tokens:
                    used[t.flatten().cpu()] = True
            model.train()
            mse = err.item() / data.held_count
            return {"heldout_mse": mse, "heldout_psnr": 10 * math.log10(4 / mse), "code_usage": used.float().mean().item()}

        return Task(model, lambda m, x: T.vqvae_step(m, x, pn), lambda x, y, step: (x.to(device),), evaluate,
                    {"vqvae_config": asdict(sizes.vqvae), "patch_nums": list(pn), **data_info}, data)

    # VAR and HMAR: a frozen tokenizer turns the synthetic set into token pyramids once, a folder per batch.
    vae = _tokenizer(cfg, sizes, device)
    pn = sizes.patch_nums
    seq_len = sum(p * p for p in pn)
    ends = np.cumsum([p * p for p in pn])[:-1].tolist()

    @torch.no_grad()
    def tokenize(imgs: Tensor, split: str) -> Tensor:  # minutes on a CPU for the zoo's 10,000 images
        out = torch.empty(len(imgs), seq_len, dtype=torch.long)
        with bar(len(imgs), f"tokenize {split} images", "img", cfg.progress and rank == 0) as shown:
            def enc(sl: slice) -> None:
                out[sl] = torch.cat(vae.encode_tokens(T.images_to_tensor(imgs[sl]).to(device), pn), dim=1).cpu()
                shown.update(sl.stop - sl.start)
            _batched(enc, len(imgs))
        return out

    @torch.no_grad()
    def encode(images: Tensor) -> Tensor:  # one streamed batch, uint8 on the device first (a quarter the bytes)
        return torch.cat(vae.encode_tokens(T.images_to_tensor(images.to(device)), pn), dim=1)

    if isinstance(data, MemoryData):
        data = MemoryData(tokenize(data.x, "training"), data.labels, tokenize(data.held_x, "held-out"),
                          data.held_labels, data.indices, rank, world)
        tokens = _TokenData(data, lambda t: t.to(device), ends, device)
    else:
        tokens = _TokenData(data, encode, ends, device)
    info = {"vqvae": cfg.vqvae or f"random (seed {cfg.seed + 1})", **data_info}
    if cfg.kind == "var":
        return _var_task(cfg, vae, gen, tokens, rank, info)
    return _hmar_task(cfg, vae, gen, tokens, rank, info)


def _tokenizer(cfg: TrainConfig, sizes: ModelSizes, device: torch.device) -> nn.Module:
    """The frozen VQVAE of a VAR or HMAR job: `cfg.vqvae` (checked against the preset), or a seeded random one."""
    from . import steps as T
    from varbench.variants.loading import load_vqvae
    from varbench.variants.vqvae import VQVAE

    if cfg.vqvae:
        vae = load_vqvae(cfg.vqvae).float()
        if vae.cfg.vocab_size != sizes.vqvae.vocab_size or vae.cfg.z_channels != sizes.vqvae.z_channels:
            raise ValueError(f"{cfg.vqvae} (vocab {vae.cfg.vocab_size}, Cvae {vae.cfg.z_channels}) does not fit "
                             f"preset {cfg.preset!r} (vocab {sizes.vqvae.vocab_size}, Cvae {sizes.vqvae.z_channels})")
        down, last = 2 ** (len(vae.cfg.ch_mult) - 1), sizes.patch_nums[-1]
        if down * last != sizes.image_size:  # else the last scale's token map is not the latent's size
            raise ValueError(f"{cfg.vqvae} downsamples {down}x, so a {last}x{last} last scale needs "
                             f"{down * last} px images; preset {cfg.preset!r} uses {sizes.image_size} px")
    else:
        vae = T.init_vqvae_(VQVAE(sizes.vqvae), torch.Generator().manual_seed(cfg.seed + 1))
    return vae.to(device).eval().requires_grad_(False)


@dataclass
class _TokenData:
    data: Data  # token pyramids in memory (synthetic), or images streamed from a folder
    tokens: Callable[[Tensor], Tensor]  # a batch of data's samples -> (B, L) tokens on the device
    ends: list[int]  # split points of the L positions into scales
    device: torch.device

    def split(self, tok: Tensor) -> list[Tensor]:
        return list(tok.tensor_split(self.ends, dim=1))

    def heldout_mean(self, score: Callable[[list[Tensor], Tensor], dict[str, float]]) -> dict[str, float]:
        """Held-out average of per-batch metrics (each weighted by its batch size); {} without a held-out split."""
        totals: dict[str, float] = {}
        for x, lab in self.data.heldout(64):
            for k, v in score(self.split(self.tokens(x)), lab.to(self.device)).items():
                totals[k] = totals.get(k, 0.0) + v * len(lab)
        return {k: v / self.data.held_count for k, v in totals.items()}


def _var_task(cfg: TrainConfig, vae: nn.Module, gen: torch.Generator, data: _TokenData, rank: int,
              info: dict[str, Any]) -> Task:
    from varbench.harness.core.checkpoints import load_strict, read_state_dict
    from . import steps as T
    from varbench.variants.loading import identify
    from varbench.variants.var_model import VARConfig, VARNet

    var_cfg = T.var_config(cfg.preset, cfg.depth)
    if not 0 <= cfg.from_scale < len(var_cfg.patch_nums):
        raise ValueError(f"from_scale must be in 0..{len(var_cfg.patch_nums) - 1}, got {cfg.from_scale}")
    if cfg.init:  # fine-tuning (a CoDe-style refiner): start from a trained VAR of the same size
        sd = read_state_dict(cfg.init)
        if identify(sd) != "var":
            raise ValueError(f"--init {cfg.init} is not a VAR state dict (looks like: {identify(sd)})")
        found = VARConfig.from_state_dict(sd, var_cfg.patch_nums)
        if found != var_cfg:
            raise ValueError(f"--init {cfg.init} holds {found}, but preset {cfg.preset!r} at depth {cfg.depth} "
                             f"is {var_cfg}")
        model = VARNet(var_cfg)
        load_strict(model, sd, cfg.init, f"VAR-d{cfg.depth}")
    else:
        model = T.init_var_(VARNet(var_cfg), gen)

    def batch(x: Tensor, labels: Tensor, step: int) -> tuple[Any, ...]:
        return data.tokens(x), labels.to(data.device), step_generator(cfg, step, rank)

    def loss_fn(m: nn.Module, tok: Tensor, lab: Tensor, coins: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return T.var_step(m, vae, data.split(tok), lab, cfg.cond_drop, coins, cfg.from_scale)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()

        def score(tok: list[Tensor], lab: Tensor) -> dict[str, float]:
            loss, m = T.var_step(model, vae, tok, lab, 0.0, None, cfg.from_scale)
            if cfg.from_scale:  # heldout_ce stays the all-token CE that every VAR of the zoo reports
                return {"heldout_ce": m["ce_all"], "heldout_ce_from_scale": loss.item(),
                        "heldout_acc_from_scale": m["acc"]}
            return {"heldout_ce": loss.item(), "heldout_acc": m["acc"]}
        out = data.heldout_mean(score)
        model.train()
        return {**out, "uniform_ce": math.log(var_cfg.vocab_size)}

    if cfg.init or cfg.from_scale:  # only then: plain VAR summaries stay as they were
        info.update(init=cfg.init or "scratch", from_scale=cfg.from_scale)
    return Task(model, loss_fn, batch, evaluate, {"var_config": asdict(var_cfg), **info}, data.data)


def _hmar_task(cfg: TrainConfig, vae: nn.Module, gen: torch.Generator, data: _TokenData, rank: int,
               info: dict[str, Any]) -> Task:
    from varbench.harness.core.checkpoints import load_strict, read_state_dict
    from . import steps as T
    from varbench.variants.hmar_model import HMARConfig, HMARNet
    from varbench.variants.loading import identify

    h_cfg = T.hmar_config(cfg.preset, cfg.depth)
    model = T.init_hmar_(HMARNet(h_cfg), gen)
    if cfg.init:  # an HMAR model.pt (stage 1's, for stage 2), or a VAR one as base + next-scale path
        sd = read_state_dict(cfg.init)
        # identify() looks for base blocks, which an HMAR with n_layers_train = depth (the d1) does not have
        kind = "hmar" if any(k.startswith(("base_blocks.", "ns_blocks.")) for k in sd) else identify(sd)
        if kind == "var":
            try:
                sd = T.hmar_state_from_var(sd, model)
            except ValueError as err:
                raise ValueError(f"--init {cfg.init}: {err}") from None
        elif kind == "hmar":
            found = HMARConfig.from_state_dict(sd, h_cfg.patch_nums)
            if found != h_cfg:
                raise ValueError(f"--init {cfg.init} holds {found}, but preset {cfg.preset!r} at depth "
                                 f"{cfg.depth} is {h_cfg}")
        else:
            raise ValueError(f"--init {cfg.init} is neither an HMAR nor a VAR state dict (looks like: {kind})")
        load_strict(model, sd, cfg.init, f"HMAR-d{cfg.depth}")
    if cfg.stage == 2:
        T.start_masked_path_(model)
    else:
        T.hmar_trainable_(model, 1)
    pn = h_cfg.patch_nums
    weights = T.token_weights(pn, cfg.scale_weights)

    def batch(x: Tensor, labels: Tensor, step: int) -> tuple[Any, ...]:
        return data.tokens(x), labels.to(data.device), step_generator(cfg, step, rank)

    def loss_fn(m: nn.Module, tok: Tensor, lab: Tensor, coins: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        if cfg.stage == 2:
            return T.hmar_mask_step(m, vae, data.split(tok), lab, cfg.cond_drop, coins)
        return T.hmar_ns_step(m, vae, data.split(tok), lab, cfg.cond_drop, coins, weights)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        masks = torch.Generator().manual_seed(_EVAL_MASK_SEED)

        def score(tok: list[Tensor], lab: Tensor) -> dict[str, float]:
            loss, m = T.hmar_ns_step(model, vae, tok, lab, 0.0, None, weights)
            out = {"heldout_ce": m["ce"], "heldout_ce_weighted": loss.item(), "heldout_acc": m["acc"]}
            if cfg.stage == 2:  # the masked path, and the next-scale path at the same positions for comparison
                positions = T.draw_mask_positions(pn, masks)
                loss, m = T.hmar_mask_step(model, vae, tok, lab, 0.0, None, positions)
                out.update(heldout_mask_ce=loss.item(), heldout_mask_acc=m["acc"],
                           heldout_ns_ce_masked=_ns_ce_at(model, vae, tok, lab, positions))
            return out
        out = data.heldout_mean(score)
        model.train()
        return {**out, "uniform_ce": math.log(h_cfg.vocab_size)}

    return Task(model, loss_fn, batch, evaluate,
                {"hmar_config": asdict(h_cfg), **info, "stage": cfg.stage, "init": cfg.init or "scratch",
                 "scale_weights": cfg.scale_weights if cfg.stage == 1 else "none (masked positions, unweighted)"},
                data.data)


def _ns_ce_at(net: nn.Module, vae: nn.Module, tokens: list[Tensor], labels: Tensor,
              positions: Tensor) -> float:
    """Cross entropy of the next-scale path at the given positions of the L−1 inputs of scales 1..."""
    x_ns = vae.tokens_to_var_input(tokens, net.cfg.patch_nums)
    logits = net(labels, x_ns, attn_impl="sdpa")[:, 1:][:, positions]
    target = torch.cat(tokens, dim=1)[:, 1:][:, positions]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).item()
