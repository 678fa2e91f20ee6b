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
  `from_scale` = N restricts the loss to the tokens of scales ≥ N (a CoDe-style refiner, see `var_step`).
* `hmar_ns_step` / `hmar_mask_step`: HMAR's two training stages (docs/HMAR_SPEC.md §5, §7), see the HMAR section.
* `classifier_step`: cross entropy of `ProjectCNN` on the synthetic data set's labels.

Zoo sizes are in variants/presets.py, the zoo plan in plan.py, the budget arithmetic in `zoo_budget`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varbench.variants.hmar_model import HMARNet
from varbench.variants.var_model import VARNet
from varbench.variants.params import param_count  # noqa: F401  (re-exported)
from varbench.variants.vqvae import VQVAE
from varbench.variants.presets import (IMAGENET256, TINY, ZOO, ZOO_CODE_DRAFT_STEPS, ZOO_IMAGE_SIZE,  # noqa: F401
                                     ZOO_NUM_CLASSES, ZOO_PATCH_NUMS, ZOO_VAR_DEPTHS, ModelSizes, hmar_config,
                                     hmar_n_layers_train, sizes, var_config)

from .plan import (SECONDS_PER_STEP_1THREAD, TOKENIZE_MINUTES, VQVAE_THREAD_SPEEDUP, ZOO_LANES,  # noqa: F401
                   ZOO_PLAN, ZOO_SHIPPED, ZOO_VAR_LR, ZooJob, plan_minutes, zoo_budget)

__all__ = ["init_var_", "init_vqvae_", "init_hmar_", "images_to_tensor", "quantize_train", "vqvae_step", "var_step",
           "classifier_step", "drop_labels", "param_count", "lognormal_scale_weights", "token_weights",
           "draw_mask_positions", "hmar_ns_step", "hmar_mask_step", "hmar_trainable_", "start_masked_path_",
           "hmar_state_from_var"]  # and, re-exported, the presets and the zoo plan

# -- initialisation ---------------------------------------------------------------------------------------

@torch.no_grad()
def init_var_(net: VARNet, generator: torch.Generator, init_adaln_gamma: float = 1e-3,
              init_head: float = 0.02, init_adaln: float = 0.5) -> VARNet:
    """VAR's from-scratch init as docs/VAR_SPEC.md §3 describes it (written from that description).

    Linear/Embedding weights and the position tensors ~ truncated N(0, 1/(3C)) (cut at ±2 std), biases zero;
    head ×init_head; head_nm AdaLN ×init_adaln; attn.proj and fc2 ÷√(2·depth); per-block AdaLN rows of
    scale/shift ×init_adaln and rows of the two gammas ×init_adaln_gamma; per-head logit scale ln 4.
    """
    return _init_transformer_(net, [(net.head, net.head_nm)], generator, init_adaln_gamma, init_head, init_adaln)


@torch.no_grad()
def init_hmar_(net: HMARNet, generator: torch.Generator, init_adaln_gamma: float = 1e-3,
               init_head: float = 0.02, init_adaln: float = 0.5) -> HMARNet:
    """`init_var_`'s recipe on an HMARNet: both heads like VAR's head, every block (base, ns, mask) like VAR's,
    depth = the blocks one path runs; word_embed_bias zero (it is VAR's word_embed bias), mask_embed as an
    embedding. The official build leaves its weights uninitialised (HMAR_SPEC §1) and its training init was not
    read, so this choice is unverified."""
    return _init_transformer_(net, [(net.ns_head, net.ns_head_nm), (net.mask_head, net.mask_head_nm)], generator,
                              init_adaln_gamma, init_head, init_adaln)


def _init_transformer_(net: nn.Module, heads: Sequence[tuple[nn.Linear, nn.Module]], generator: torch.Generator,
                       init_adaln_gamma: float, init_head: float, init_adaln: float) -> nn.Module:
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
    for head, head_nm in heads:
        head.weight.mul_(init_head)
        head_nm.ada_lin[1].weight.mul_(init_adaln)
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
             generator: torch.Generator | None = None, from_scale: int = 0) -> tuple[Tensor, dict[str, float]]:
    """Teacher-forced cross entropy over the tokens of scales ≥ `from_scale` (0: all) of one batch.

    tokens: per-scale token maps (B, pn²) from the frozen VQVAE; labels (B,). The network still reads every
    scale (later scales attend to earlier ones), only the loss skips the earlier scales' predictions; with
    from_scale > 0 the metrics add `ce_all`, the cross entropy over all tokens.

    from_scale = N trains a CoDe-style refiner, which generates scales N.. only. CoDe's paper (docs/VARIANTS.md
    §1.1) fine-tunes its refiner by knowledge distillation from a larger VAR, all scales first, the refined scales
    alone at the end; its training code is not released and docs/CODE_SPEC.md covers inference only. This
    objective, ground-truth tokens on scales ≥ N, is the data-label analogue of that end point. Unverified.
    """
    patch_nums = var.cfg.patch_nums
    with torch.no_grad():
        x_in = vae.tokens_to_var_input(list(tokens), patch_nums)
    target = torch.cat(list(tokens), dim=1)
    labels = drop_labels(labels, cond_drop, var.cfg.num_classes, generator)
    logits = var(labels, x_in)
    start = var.begin_ends[from_scale][0]
    part, part_target = (logits[:, start:], target[:, start:]) if start else (logits, target)
    loss = F.cross_entropy(part.reshape(-1, logits.shape[-1]), part_target.reshape(-1))
    with torch.no_grad():
        acc = (part.argmax(-1) == part_target).float().mean().item()
        last = var.begin_ends[-1][0]
        tail = F.cross_entropy(logits[:, last:].reshape(-1, logits.shape[-1]), target[:, last:].reshape(-1)).item()
        metrics = {"acc": acc, "tail": tail}
        if start:
            metrics["ce_all"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).item()
    return loss, metrics


def classifier_step(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Cross entropy of ProjectCNN logits on uint8 (B, H, W, 3) images."""
    logits = model(images.permute(0, 3, 1, 2).contiguous())
    loss = F.cross_entropy(logits, labels)
    return loss, {"acc": (logits.argmax(-1) == labels).float().mean().item()}


# -- HMAR -------------------------------------------------------------------------------------------------
#
# Two stages (docs/HMAR_SPEC.md §7, docs/VARIANTS.md §4.3). Stage 1 trains the next-scale network (base + ns
# blocks, ns head) with Markov attention and per-scale loss weights; stage 2 starts the masked path from it and
# trains only mask_embed, the mask blocks and the mask head on masked token prediction. Both run the block-
# diagonal pattern through SDPA with a boolean mask: differentiable everywhere, and the same maths as the
# official Triton kernel (varbench.kernels' kernel is forward-only).

_MASK_PATH = ("mask_blocks.", "mask_head_nm.", "mask_head.", "mask_embed.")


def lognormal_scale_weights(patch_nums: Sequence[int]) -> Tensor:
    """HMAR's "log-normal" per-scale loss weights (S,), summing to 1.

    docs/VARIANTS.md §4.3: w_k ∝ the standard-normal pdf of the z-scored side ratios taken in reversed scale order
    (scale k gets the ratio of scale S−1−k). With the unbiased std this reproduces the weights listed there for
    the 256 px schedule to 3 decimals (tested); the official code of this step was not read, so the formula
    itself is unverified. The ratio's denominator cancels in the z-score.
    """
    r = torch.tensor(list(patch_nums)[::-1], dtype=torch.float64)
    z = (r - r.mean()) / r.std()
    w = torch.exp(-0.5 * z * z)
    return (w / w.sum()).float()


def token_weights(patch_nums: Sequence[int], scheme: str = "lognormal") -> Tensor:
    """(L,) per-token loss weights summing to 1: 'uniform' = 1/L (the mean over tokens, as `var_step`);
    'lognormal' = each scale's `lognormal_scale_weights` entry spread evenly over its pn² tokens."""
    counts = torch.tensor([pn * pn for pn in patch_nums])
    if scheme == "uniform":
        return torch.full((int(counts.sum()),), 1.0 / float(counts.sum()))
    if scheme == "lognormal":
        return (lognormal_scale_weights(patch_nums) / counts).repeat_interleave(counts)
    raise ValueError(f"scale weights must be 'lognormal' or 'uniform', got {scheme!r}")


def draw_mask_positions(patch_nums: Sequence[int], generator: torch.Generator | None = None,
                        p: float | None = None) -> Tensor:
    """The masked positions of one batch, as indices into the L−1 inputs of scales 1.. (HMARNet.forward's
    `mask_positions`): for every scale k ≥ 1, ceil(pn_k²·p) distinct positions drawn uniformly, shared by the
    whole batch (HMAR_SPEC §5). p ~ U(0, 1) once per call unless given (docs/VARIANTS.md §4.3, from a note, not
    the code: unverified). At least one position per scale, so that a draw of p ≈ 0 still leaves a target."""
    if p is None:
        p = float(torch.rand((), generator=generator))
    out, begin = [], 0
    for pn in patch_nums[1:]:
        n = pn * pn
        m = min(n, max(1, math.ceil(n * p)))
        out.append(torch.randperm(n, generator=generator)[:m] + begin)
        begin += n
    return torch.cat(out)


def hmar_ns_step(net: HMARNet, vae: VQVAE, tokens: Sequence[Tensor], labels: Tensor, cond_drop: float = 0.1,
                 generator: torch.Generator | None = None, weights: Tensor | None = None,
                 ) -> tuple[Tensor, dict[str, float]]:
    """Stage 1: teacher-forced next-scale prediction through base + ns blocks with Markov attention.

    loss = Σ_tokens weights·CE per image, averaged over the batch (weights: `token_weights`, summing to 1;
    None = uniform, the mean over tokens). Label dropout as `var_step`. Metrics: `ce` (uniform mean), `acc`.
    """
    pn = net.cfg.patch_nums
    with torch.no_grad():
        x_ns = vae.tokens_to_var_input(list(tokens), pn)
    target = torch.cat(list(tokens), dim=1)
    labels = drop_labels(labels, cond_drop, net.cfg.num_classes, generator)
    logits = net(labels, x_ns, attn_impl="sdpa")
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    ce = ce.view_as(target)
    loss = ce.mean() if weights is None else (ce * weights.to(ce.device)).sum(dim=1).mean()
    with torch.no_grad():
        acc = (logits.argmax(-1) == target).float().mean().item()
    return loss, {"ce": ce.detach().mean().item(), "acc": acc}


def hmar_mask_step(net: HMARNet, vae: VQVAE, tokens: Sequence[Tensor], labels: Tensor, cond_drop: float = 0.1,
                   generator: torch.Generator | None = None, positions: Tensor | None = None,
                   ) -> tuple[Tensor, dict[str, float]]:
    """Stage 2: masked prediction through base + mask blocks (HMAR_SPEC §5 "training masked path").

    Input: next-scale input + each scale's own ground-truth token features, with the rows at `positions`
    (default: `draw_mask_positions` from `generator`, after the label-dropout coins) replaced by [MASK]. Loss:
    unweighted CE over the masked positions only. Metrics: `acc` there, `masked` (the fraction of L−1 masked).
    """
    from varbench.variants.hmar import mask_token_input  # variants.hmar imports the harness: import it at call time

    pn = net.cfg.patch_nums
    with torch.no_grad():
        x_ns = vae.tokens_to_var_input(list(tokens), pn)
        x_mask = mask_token_input(vae, list(tokens), pn)
    target = torch.cat(list(tokens), dim=1)[:, 1:]  # the L−1 positions of scales 1..
    labels = drop_labels(labels, cond_drop, net.cfg.num_classes, generator)
    if positions is None:
        positions = draw_mask_positions(pn, generator)
    positions = positions.to(x_ns.device)
    logits = net(labels, x_ns, x_mask, positions, attn_impl="sdpa")[:, 1:][:, positions]
    target = target[:, positions]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    with torch.no_grad():
        acc = (logits.argmax(-1) == target).float().mean().item()
    return loss, {"acc": acc, "masked": len(positions) / x_ns.shape[1]}


def hmar_trainable_(net: HMARNet, stage: int) -> HMARNet:
    """Which parameters a stage trains: stage 1 everything but the masked path (unused there, and DDP needs
    every trained parameter used), stage 2 only the masked path: mask blocks, mask head, mask_embed (§7)."""
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith(_MASK_PATH) == (stage == 2))
    return net


@torch.no_grad()
def start_masked_path_(net: HMARNet) -> HMARNet:
    """Stage 2's start: the masked path's blocks and head become copies of the trained next-scale path's, as the
    official MaskedPrediction network is initialised from the whole stage-1 network (HMAR_SPEC §2, §7: its last
    n blocks and head turn into mask_blocks and mask_head). mask_embed keeps its initialisation."""
    net.mask_blocks.load_state_dict(net.ns_blocks.state_dict())
    net.mask_head_nm.load_state_dict(net.ns_head_nm.state_dict())
    net.mask_head.load_state_dict(net.ns_head.state_dict())
    return hmar_trainable_(net, 2)


def hmar_state_from_var(var_sd: dict[str, Tensor], net: HMARNet) -> dict[str, Tensor]:
    """A VAR-layout state dict as `net`'s base + next-scale path (HMAR_SPEC §2, `load_base_and_ns_state_dict`);
    the masked path keeps `net`'s tensors. VAR's block-causal `attn_bias_for_masking` is not copied: HMAR's is
    block-diagonal. Raises ValueError for a key with no HMAR counterpart."""
    depth = len({k.split(".")[1] for k in var_sd if k.startswith("blocks.")})
    if depth != net.cfg.depth:
        raise ValueError(f"the VAR has {depth} blocks, the HMAR path {net.cfg.depth}")
    out = dict(net.state_dict())
    n_base = net.cfg.n_base
    for key, value in var_sd.items():
        if key == "attn_bias_for_masking":
            continue
        if key.startswith(("head.", "head_nm.")):
            key = "ns_" + key
        elif key == "word_embed.bias":
            key = "word_embed_bias"
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            key = f"base_blocks.{i}.{rest}" if int(i) < n_base else f"ns_blocks.{int(i) - n_base}.{rest}"
        if key not in out:
            raise ValueError(f"VAR state dict entry {key!r} has no counterpart in HMAR")
        out[key] = value
    return out


# -- budget ---------------------------------------------------------------------------------------------
#
# Sizes (fp16 bytes = 2 x params): VQVAE 3.24 M, VAR d1 44 k, d2 0.20 M, d3 0.59 M, d4 1.31 M, d5 2.48 M
# (width 32·depth, heads = depth, vocab 512, Cvae 16, L = 155), ProjectCNN 0.39 M, the CoDe refiner a second
# d2, HMAR-d5 2.5 M + its masked path: about 12 M params, 25 MB in fp16 (< 50 MB).
#
# Time (`SECONDS_PER_STEP_1THREAD`, measured on this project's 2-core CPU with one torch thread per job and
# both cores busy; the VQVAE at batch 32): the zoo trains in two phases. Phase 1: the VQVAE on two threads
# (1200 steps at batch 16) beside the classifier. Phase 2: two single-thread lanes side by side (`ZOO_LANES`;
# a member that starts from another comes after it in the same lane); each VAR/HMAR job first tokenises the
# 10,500 images (`TOKENIZE_MINUTES`). `plan_minutes` turns the measurements into the plan's wall time.
#
