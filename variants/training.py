"""Model-specific training pieces for the small 64 px zoo: configs, initialisation and one-step losses.

The generic loop (optimiser, schedule, checkpoints, DDP, logging) lives in `varbench.harness.train`; this module
only knows how to compute each model's loss on a batch. Objectives follow docs/VAR_SPEC.md:

* `vqvae_step`: L2 reconstruction + the multi-scale residual quantizer's terms, averaged over the S scales:
  beta·‖sg(f_hat_s) − f‖² (commitment, trains the encoder) + ‖f_hat_s − sg(f)‖² (codebook and φ convs), where
  f_hat_s is the partial sum after scale s; the decoder sees f_hat with a straight-through gradient to f.
  The scale loop is the one `VQVAE.encode_tokens` runs at inference (area-down, nearest code, bicubic-up, φ).
* `var_step`: teacher-forced next-scale prediction — cross entropy over all L tokens with uniform weight 1/L
  (i.e. the mean over tokens), the block-causal mask, and class-label dropout to the null class
  (`num_classes`) with probability `cond_drop` for classifier-free guidance.
* `classifier_step`: cross entropy of `ProjectCNN` on the synthetic data set's labels.

Zoo sizes and the budget arithmetic are in `ZOO` / `zoo_budget` below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .var_model import PATCH_NUMS, VARConfig, VARNet
from .vqvae import VQVAE, VQVAEConfig

__all__ = ["ZOO_PATCH_NUMS", "ZOO_IMAGE_SIZE", "ZOO_NUM_CLASSES", "ZOO_VAR_DEPTHS", "ModelSizes", "ZOO", "TINY",
           "sizes", "var_config", "init_var_", "init_vqvae_", "images_to_tensor", "quantize_train",
           "vqvae_step", "var_step", "classifier_step", "drop_labels", "param_count", "zoo_budget",
           "ZOO_PLAN", "ZOO_LANES", "SECONDS_PER_STEP_1THREAD", "VQVAE_THREAD_SPEEDUP",
           "plan_minutes"]

ZOO_IMAGE_SIZE = 64
ZOO_PATCH_NUMS: tuple[int, ...] = PATCH_NUMS[155]  # (1, 2, 3, 4, 5, 6, 8): L = 155 tokens on an 8x8 latent
ZOO_NUM_CLASSES = 10
ZOO_VAR_DEPTHS: tuple[int, ...] = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class ModelSizes:
    """One preset: the tokenizer and how VAR transformers on top of it are sized."""

    name: str
    vqvae: VQVAEConfig
    width_per_depth: int = 64  # VAR width = 64·depth and heads = depth (head dim 64), as in the released zoo
    patch_nums: tuple[int, ...] = ZOO_PATCH_NUMS
    num_classes: int = ZOO_NUM_CLASSES


# The zoo: an 8x VQVAE (64 px -> 8x8 latent; three downsamples), vocab 512, Cvae 16, one res block per level.
ZOO = ModelSizes("zoo", VQVAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, vocab_size=512, z_channels=16,
                                    num_phi=4, hit_rows=len(ZOO_PATCH_NUMS)))
# Test preset: same schedule and image size, a much thinner tokenizer and width 32·depth.
TINY = ModelSizes("tiny", VQVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, vocab_size=64, z_channels=8,
                                      num_phi=4, hit_rows=len(ZOO_PATCH_NUMS)), width_per_depth=32)
_PRESETS = {p.name: p for p in (ZOO, TINY)}


def sizes(preset: str) -> ModelSizes:
    try:
        return _PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown size preset {preset!r}; known: {', '.join(_PRESETS)}") from None


def var_config(preset: str, depth: int) -> VARConfig:
    p = sizes(preset)
    return VARConfig(depth=depth, width=p.width_per_depth * depth, heads=depth, patch_nums=p.patch_nums,
                     vocab_size=p.vqvae.vocab_size, z_channels=p.vqvae.z_channels, num_classes=p.num_classes)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- initialisation ---------------------------------------------------------------------------------------

@torch.no_grad()
def init_var_(net: VARNet, generator: torch.Generator, init_adaln_gamma: float = 1e-3,
              init_head: float = 0.02, init_adaln: float = 0.5) -> VARNet:
    """VAR's from-scratch init as docs/VAR_SPEC.md §3 describes it (written from that description).

    Linear/Embedding weights and the position tensors ~ truncated N(0, 1/(3C)) (cut at ±2 std), biases zero;
    head ×init_head; head_nm AdaLN ×init_adaln; attn.proj and fc2 ÷√(2·depth); per-block AdaLN rows of
    scale/shift ×init_adaln and rows of the two gammas ×init_adaln_gamma; per-head logit scale ln 4.
    """
    c, depth = net.cfg.width, net.cfg.depth
    std = math.sqrt(1 / (3 * c))

    def trunc_(t: Tensor) -> None:
        t.copy_(torch.randn(t.shape, generator=generator).clamp_(-2, 2).mul_(std))

    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            trunc_(m.weight)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    for t in (net.pos_start, net.pos_1LC):
        trunc_(t)
    net.head.weight.mul_(init_head)
    net.head_nm.ada_lin[1].weight.mul_(init_adaln)
    for block in net.blocks:
        block.attn.proj.weight.div_(math.sqrt(2 * depth))
        block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
        block.attn.q_bias.zero_()
        block.attn.v_bias.zero_()
        block.attn.scale_mul_1H11.fill_(math.log(4.0))
        if hasattr(block, "ada_lin"):
            w = block.ada_lin[1].weight
            w[2 * c:].mul_(init_adaln)
            w[:2 * c].mul_(init_adaln_gamma)
    return net


@torch.no_grad()
def init_vqvae_(vae: VQVAE, generator: torch.Generator) -> VQVAE:
    """Seeded PyTorch-default-style init (uniform ±1/√fan_in) for convs, codebook ~ U(±1/√Cvae), GN affine 1/0."""
    for name, p in vae.named_parameters():
        if p.ndim > 1:
            bound = 1 / math.sqrt(p[0].numel())
            p.copy_(torch.rand(p.shape, generator=generator).mul_(2 * bound).sub_(bound))
        else:
            p.zero_()
    for m in vae.modules():
        if isinstance(m, nn.GroupNorm):
            m.weight.fill_(1.0)
    bound = 1 / math.sqrt(vae.cfg.z_channels)
    vae.quantize.embedding.weight.copy_(
        torch.rand(vae.quantize.embedding.weight.shape, generator=generator).mul_(2 * bound).sub_(bound))
    vae.quantize.ema_vocab_hit_SV.zero_()
    return vae


# -- losses -----------------------------------------------------------------------------------------------

def images_to_tensor(images: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) to float (B, 3, H, W) in [-1, 1] (VAR's x·2 − 1 of a [0, 1] image)."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def quantize_train(vae: VQVAE, f: Tensor, patch_nums: Sequence[int], beta: float = 0.25,
                   ) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Training pass of the residual quantizer on encoder features f (B, Cvae, h, w).

    Returns (f_hat with a straight-through gradient to f, the mean over scales of the commitment + codebook
    terms, the token maps). Token choice equals `VQVAE.encode_tokens`.
    """
    s = len(patch_nums)
    b, c, hh, ww = f.shape
    f_ng = f.detach()
    f_rest = f_ng.clone()
    f_hat = torch.zeros_like(f)
    codebook = vae.quantize.embedding.weight
    vq_loss = f.new_zeros(())
    tokens = []
    for si, pn in enumerate(patch_nums):
        last = si == s - 1
        with torch.no_grad():
            z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, c)
            cb = codebook.detach()
            dist = (z.square().sum(dim=1, keepdim=True) + cb.square().sum(dim=1)).addmm_(z, cb.T, alpha=-2, beta=1)
            idx = dist.argmin(dim=1).view(b, pn * pn)
        h = vae.embed(idx, pn)
        if not last:
            h = F.interpolate(h, size=(hh, ww), mode="bicubic")
        h = vae.quantize.phi(si, s)(h)
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f).mul(beta) + F.mse_loss(f_hat, f_ng)
        tokens.append(idx)
    f_st = (f_hat.detach() - f_ng) + f  # value f_hat, gradient straight through to the encoder
    return f_st, vq_loss / s, tokens


@torch.no_grad()
def _record_hits(vae: VQVAE, tokens: Sequence[Tensor], momentum: float = 0.99) -> float:
    """EMA of per-scale codebook hits in the `ema_vocab_hit_SV` buffer; returns the batch's code usage (0..1)."""
    hits = vae.quantize.ema_vocab_hit_SV
    v = hits.shape[1]
    used = torch.zeros(v, dtype=torch.bool, device=hits.device)
    for si, idx in enumerate(tokens):
        count = idx.flatten().bincount(minlength=v).float()
        used |= count > 0
        if si < hits.shape[0]:
            hits[si].mul_(momentum).add_(count, alpha=1 - momentum)
    return used.float().mean().item()


def vqvae_step(vae: VQVAE, images: Tensor, patch_nums: Sequence[int], beta: float = 0.25,
               ) -> tuple[Tensor, dict[str, float]]:
    """Loss of one batch of uint8 (B, H, W, 3) images: L2 reconstruction + quantizer terms."""
    x = images_to_tensor(images)
    f_hat, vq_loss, tokens = quantize_train(vae, vae.quant_conv(vae.encoder(x)), patch_nums, beta)
    recon = vae.decoder(vae.post_quant_conv(f_hat))  # no clamp in training: it would stop gradients
    rec_loss = F.mse_loss(recon, x)
    usage = _record_hits(vae, tokens) if vae.training else float("nan")
    return rec_loss + vq_loss, {"rec": rec_loss.item(), "vq": vq_loss.item(), "usage": usage}


def drop_labels(labels: Tensor, p: float, null_class: int, generator: torch.Generator | None) -> Tensor:
    """Class-label dropout for CFG: each label becomes the null class with probability p."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


def var_step(var: VARNet, vae: VQVAE, tokens: Sequence[Tensor], labels: Tensor, cond_drop: float = 0.1,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """Teacher-forced cross entropy over all scales' tokens of one batch.

    tokens: per-scale token maps (B, pn²) from the frozen VQVAE; labels (B,).
    """
    patch_nums = var.cfg.patch_nums
    with torch.no_grad():
        x_in = vae.tokens_to_var_input(list(tokens), patch_nums)
    target = torch.cat(list(tokens), dim=1)
    labels = drop_labels(labels, cond_drop, var.cfg.num_classes, generator)
    logits = var(labels, x_in)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    with torch.no_grad():
        acc = (logits.argmax(-1) == target).float().mean().item()
        last = var.begin_ends[-1][0]
        tail = F.cross_entropy(logits[:, last:].reshape(-1, logits.shape[-1]), target[:, last:].reshape(-1)).item()
    return loss, {"acc": acc, "tail": tail}


def classifier_step(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Cross entropy of ProjectCNN logits on uint8 (B, H, W, 3) images."""
    logits = model(images.permute(0, 3, 1, 2).contiguous())
    loss = F.cross_entropy(logits, labels)
    return loss, {"acc": (logits.argmax(-1) == labels).float().mean().item()}


# -- budget ---------------------------------------------------------------------------------------------
#
# Sizes (fp16 bytes = 2 x params): VQVAE 3.24 M, VAR d1 0.13 M, d2 0.72 M, d3 2.21 M, d4 5.05 M, d5 9.67 M
# (width 64·depth, heads = depth, vocab 512, Cvae 16, L = 155), ProjectCNN 0.39 M: 21.4 M params = 42.8 MB
# in fp16 (< 50 MB). A d6 (width 384) alone would add 16.4 M params (33 MB), so the zoo stops at d5, and d1
# gives the loss fit its fifth size.
#
# Time (`SECONDS_PER_STEP_1THREAD`, measured on this project's 2-core CPU with one torch thread per job and
# both cores busy): the zoo trains in two phases. Phase 1: the VQVAE on two threads (1200 steps at batch 16)
# beside nothing but the classifier. Phase 2: two single-thread lanes side by side, lane A the d5 and lane B
# d4 → d3 → d2 → d1, 500 steps at batch 32 each (equal steps and data for every size, so the loss fit
# compares sizes, not budgets). `plan_minutes` turns the measurements into the plan's wall time.

SECONDS_PER_STEP_1THREAD = {"vqvae": 3.47, "classifier": 0.35, "var_d1": 0.25, "var_d2": 0.64, "var_d3": 2.0,
                            "var_d4": 3.5, "var_d5": 6.2}
VQVAE_THREAD_SPEEDUP = 1.76  # two threads against one, VQVAE at batch 32 (0.51 vs 0.29 steps/s)
ZOO_PLAN: dict[str, dict[str, int]] = {  # steps and global batch per zoo member
    "vqvae": {"steps": 1200, "batch_size": 16},
    "classifier": {"steps": 600, "batch_size": 64},
    **{f"var_d{d}": {"steps": 500, "batch_size": 32} for d in ZOO_VAR_DEPTHS},
}
ZOO_LANES: tuple[tuple[str, ...], ...] = (("var_d5",), ("var_d4", "var_d3", "var_d2", "var_d1"))


def plan_minutes() -> dict[str, float]:
    """Wall minutes of each phase of the plan from the measured seconds per step (batch-scaled)."""
    def minutes(name: str, base_batch: int = 32) -> float:
        plan = ZOO_PLAN[name]
        return plan["steps"] * SECONDS_PER_STEP_1THREAD[name] * plan["batch_size"] / base_batch / 60

    vqvae = minutes("vqvae") / VQVAE_THREAD_SPEEDUP
    classifier = minutes("classifier", 64)
    lanes = [sum(minutes(n) for n in lane) for lane in ZOO_LANES]
    return {"vqvae": vqvae, "classifier": classifier, "var_lanes": max(lanes),
            "total": max(vqvae, classifier) + max(lanes)}


def zoo_budget(preset: str = "zoo", depths: Sequence[int] = ZOO_VAR_DEPTHS) -> dict[str, int]:
    """Parameter counts and fp16 bytes of the zoo (VQVAE, each VAR depth, ProjectCNN)."""
    from varbench.harness.extractors import ProjectCNN

    p = sizes(preset)
    with torch.device("meta"):
        counts = {"vqvae": param_count(VQVAE(p.vqvae)), "classifier": param_count(ProjectCNN(p.num_classes))}
        for d in depths:
            counts[f"var_d{d}"] = param_count(VARNet(var_config(preset, d)))
    counts["total_params"] = sum(counts.values())
    counts["fp16_bytes"] = 2 * counts["total_params"]
    return counts
