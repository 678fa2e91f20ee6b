"""What each kind of `varbench.harness.train` trains: its model, batches, loss and held-out metrics.

The loop in `harness.train` is generic; a `Task` is everything it needs to know about one kind. The losses
themselves live in `varbench.variants.training`. Kinds:

* `classifier`, `vqvae`: images straight from the synthetic set.
* `var`, `hmar`: a frozen tokenizer (`vqvae`, or a seeded random one for tests) turns the data set into token
  pyramids once; steps draw label-dropout coins (and HMAR's masks) from a generator seeded by (seed, step, rank).
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

from .synthetic import make_dataset

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = ["HELDOUT_START", "Task", "build_task", "step_generator"]

HELDOUT_START = 1_000_000  # global image index of the held-out split (training uses [0, num_train))
_SEED_STRIDE = 1_000_003
_EVAL_MASK_SEED = 12345  # held-out masks: one fixed stream, so stage-2 scores are comparable between runs


@dataclass
class Task:
    model: nn.Module  # trained and exported
    loss_fn: Callable[..., tuple[Tensor, dict[str, float]]]  # (model, *batch) -> (loss, metrics)
    batch: Callable[[Tensor, int], tuple[Any, ...]]  # (indices, step) -> this rank's batch
    evaluate: Callable[[], dict[str, float]]
    info: dict[str, Any]


def step_generator(cfg: TrainConfig, step: int, rank: int = -1) -> torch.Generator:
    """A generator determined by (seed, step, rank) only: rank -1 = shared by all ranks (batch indices)."""
    return torch.Generator().manual_seed((cfg.seed * _SEED_STRIDE + step) * 1024 + rank + 1)


def _images(cfg: TrainConfig, heldout: bool) -> tuple[Tensor, Tensor]:
    n, start = (cfg.num_heldout, HELDOUT_START) if heldout else (cfg.num_train, 0)
    images, labels = make_dataset(n, seed=cfg.data_seed, size=64, start=start)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _batched(fn: Callable[[slice], None], n: int, size: int = 128) -> None:
    for lo in range(0, n, size):
        fn(slice(lo, min(n, lo + size)))


def build_task(cfg: TrainConfig, rank: int, world: int) -> Task:
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

        return Task(model, T.classifier_step, lambda idx, step: (shard(images[idx]), shard(labels[idx])),
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

        return Task(model, lambda m, x: T.vqvae_step(m, x, pn), lambda idx, step: (shard(images[idx]),),
                    evaluate, {"vqvae_config": asdict(sizes.vqvae), "patch_nums": list(pn)})

    # VAR and HMAR: a frozen tokenizer turns the data set into token pyramids once.
    from varbench.variants.loading import load_vqvae
    from varbench.variants.vqvae import VQVAE

    if cfg.vqvae:
        vae = load_vqvae(cfg.vqvae).float()
        if vae.cfg.vocab_size != sizes.vqvae.vocab_size or vae.cfg.z_channels != sizes.vqvae.z_channels:
            raise ValueError(f"{cfg.vqvae} (vocab {vae.cfg.vocab_size}, Cvae {vae.cfg.z_channels}) does not fit "
                             f"preset {cfg.preset!r} (vocab {sizes.vqvae.vocab_size}, Cvae {sizes.vqvae.z_channels})")
    else:
        vae = T.init_vqvae_(VQVAE(sizes.vqvae), torch.Generator().manual_seed(cfg.seed + 1))
    vae = vae.to(device).eval().requires_grad_(False)
    pn = sizes.patch_nums
    seq_len = sum(p * p for p in pn)
    ends = np.cumsum([p * p for p in pn])[:-1].tolist()

    @torch.no_grad()
    def tokenize(imgs: Tensor) -> Tensor:
        out = torch.empty(len(imgs), seq_len, dtype=torch.long)

        def enc(sl: slice) -> None:
            out[sl] = torch.cat(vae.encode_tokens(T.images_to_tensor(imgs[sl]).to(device), pn), dim=1).cpu()
        _batched(enc, len(imgs))
        return out

    tokens, held_tokens = tokenize(images), tokenize(held_images)
    data = _TokenData(tokens, labels, held_tokens, held_labels, ends, device)
    info = {"vqvae": cfg.vqvae or f"random (seed {cfg.seed + 1})"}
    if cfg.kind == "var":
        return _var_task(cfg, vae, gen, data, shard, rank, info)
    return _hmar_task(cfg, vae, gen, data, shard, rank, info)


@dataclass
class _TokenData:
    tokens: Tensor  # (N, L) training token pyramids
    labels: Tensor
    held_tokens: Tensor
    held_labels: Tensor
    ends: list[int]  # split points of the L positions into scales
    device: torch.device

    def split(self, tok: Tensor) -> list[Tensor]:
        return list(tok.tensor_split(self.ends, dim=1))

    def heldout_mean(self, score: Callable[[list[Tensor], Tensor], dict[str, float]]) -> dict[str, float]:
        """Held-out average of per-batch metrics (each weighted by its batch size)."""
        totals: dict[str, float] = {}
        n = len(self.held_labels)

        def run(sl: slice) -> None:
            tok, lab = self.split(self.held_tokens[sl].to(self.device)), self.held_labels[sl].to(self.device)
            for k, v in score(tok, lab).items():
                totals[k] = totals.get(k, 0.0) + v * (sl.stop - sl.start)
        _batched(run, n, 64)
        return {k: v / n for k, v in totals.items()}


def _var_task(cfg: TrainConfig, vae: nn.Module, gen: torch.Generator, data: _TokenData,
              shard: Callable[[Tensor], Tensor], rank: int, info: dict[str, Any]) -> Task:
    from varbench.harness.checkpoints import load_strict, read_state_dict
    from varbench.variants import training as T
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

    def batch(idx: Tensor, step: int) -> tuple[Any, ...]:
        return (shard(data.tokens[idx]), shard(data.labels[idx]), step_generator(cfg, step, rank))

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
    return Task(model, loss_fn, batch, evaluate, {"var_config": asdict(var_cfg), **info})


def _hmar_task(cfg: TrainConfig, vae: nn.Module, gen: torch.Generator, data: _TokenData,
               shard: Callable[[Tensor], Tensor], rank: int, info: dict[str, Any]) -> Task:
    from varbench.harness.checkpoints import load_strict, read_state_dict
    from varbench.variants import training as T
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

    def batch(idx: Tensor, step: int) -> tuple[Any, ...]:
        return (shard(data.tokens[idx]), shard(data.labels[idx]), step_generator(cfg, step, rank))

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
                 "scale_weights": cfg.scale_weights if cfg.stage == 1 else "none (masked positions, unweighted)"})


def _ns_ce_at(net: nn.Module, vae: nn.Module, tokens: list[Tensor], labels: Tensor,
              positions: Tensor) -> float:
    """Cross entropy of the next-scale path at the given positions of the L−1 inputs of scales 1..."""
    x_ns = vae.tokens_to_var_input(tokens, net.cfg.patch_nums)
    logits = net(labels, x_ns, attn_impl="sdpa")[:, 1:][:, positions]
    target = torch.cat(tokens, dim=1)[:, 1:][:, positions]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).item()
