"""Conformance of Infinity: replays the official code's outputs in a fixture folder (conformance/infinity_tiny,
docs/INFINITY_SPEC.md §0) against this implementation, in reference and engine modes.

`fp32xattn` (cross-attention in fp32): every sampled bit exact, logits and images in fp32 tolerance.
`official_bf16xattn` (the shipped bf16 cross-attention): logits within 5e-3, and bits per scale on the official
trajectory (teacher-forced replay: the recorded bits are committed, each scale is sampled with the recorded
Exp(1) noise), skipping the positions whose decision margin is below the scale's observed logit error. Plus the
teacher-forced (training) forward, the VAE encode/decode, the multi-scale BSQ bits, bitwise self-correction's
inputs, and the RoPE grid positions of every aspect template.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import Draw, SampleConfig, filter_top_k_top_p_
from varbench.harness.core.sampling_bitwise import guide_bits

from .common import CUDA_LOGITS_TOL, TOL, close, token_check

__all__ = ["check_infinity_folder", "BF16_XATTN_LOGITS_TOL"]

BF16_XATTN_LOGITS_TOL = 5e-3  # README: bf16 rounding of cross-attention inputs moves logits by up to ~1.7e-3
VARIANTS = {"fp32xattn": "fp32", "official_bf16xattn": "bf16"}


def check_infinity_folder(folder: Path, meta: dict, device: torch.device) -> list[dict[str, Any]]:
    from varbench.variants.engine import EngineConfig
    from varbench.variants.infinity import Infinity
    from varbench.variants.infinity_loading import load_bsq_vae, load_infinity_net

    on_cpu = device.type == "cpu"
    net, vae = load_infinity_net(folder / "infinity_tiny.pth"), load_bsq_vae(folder / "vae_tiny.pth")
    checks = [_count("infinity_params", net, meta["config"]["infinity"]["params"]),
              _count("vae_params", vae, meta["config"]["vae"]["params"])]
    checks += _rope_checks(folder)
    text = torch.load(folder / "text_standins.pt", weights_only=True)
    checks += _vae_checks(vae.to(device), folder / "fp32xattn" / "teacher_forcing.pt", device)
    modes = {"": EngineConfig.reference(), "engine.": EngineConfig("fp32")}
    for sub, xattn in VARIANTS.items():
        exact = xattn == "fp32" and on_cpu
        tol = (TOL["logits"] if on_cpu else CUDA_LOGITS_TOL) if xattn == "fp32" else BF16_XATTN_LOGITS_TOL

        def build(engine, prompt=None, negative=None, h_div_w=1.0, xattn=xattn):
            return Infinity(copy.deepcopy(net), copy.deepcopy(vae), engine, device, prompts=prompt,
                            negative=negative, h_div_w=h_div_w, pn=meta["config"]["pn"], xattn=xattn)

        checks += _teacher_forcing_checks(build(modes[""]), folder / sub / "teacher_forcing.pt", text, sub, tol,
                                          device)
        for run_file in sorted((folder / sub).glob("setting_*.pt")):
            run = torch.load(run_file, weights_only=True, map_location=device)
            args = run["args"]["gen_one_img"]
            negative = text[args["negative_prompt"]] if args["negative_prompt"] else None
            sampling, name = _sampling(args), f"{sub}.{run_file.stem}"
            for prefix, engine in modes.items():
                variant = build(engine, [text[args["prompt"]]], negative, args["h_div_w"])
                checks += _free_run_checks(variant, run, sampling, prefix + name, exact, tol)
            replay = build(modes[""], [text[args["prompt"]]], negative, args["h_div_w"])
            checks += _replay_checks(replay, run, sampling, name, tol, on_cpu)
    return checks


def _count(name: str, module: torch.nn.Module, want: int) -> dict[str, Any]:
    """Parameters and buffers, as meta.json counts them (the VAE's quantizer alias counted twice)."""
    got = sum(t.numel() for t in module.state_dict().values())
    return {"check": name, "got": got, "want": want, "pass": got == want}


def _sampling(args: dict) -> SampleConfig:
    def per_scale(v):
        return tuple(float(x) for x in v) if isinstance(v, list) else float(v)
    return SampleConfig(cfg=per_scale(args["cfg"]), top_k=int(args["top_k"]), top_p=float(args["top_p"]),
                        temperature=per_scale(args["tau"]))


def _rope_checks(folder: Path) -> list[dict[str, Any]]:
    from varbench.variants.infinity_schedule import (
        TEMPLATES,
        rope_angles,
        rope_positions,
        scale_schedule,
    )

    table = torch.load(folder / "rope_positions.pt", weights_only=True)
    bad = [t for t, want in table["positions"].items()
           if not torch.equal(rope_positions(TEMPLATES[float(t)], float(t)), want.long())]
    checks = [{"check": "rope.positions_all_templates", "templates": len(table["positions"]), "wrong": bad,
               "pass": not bad and len(table["positions"]) == len(TEMPLATES)}]
    for key, want in table["official_cache_prefix"].items():
        ratio, pn = key.split("/")
        cos, sin = rope_angles(rope_positions(scale_schedule(float(ratio), pn)), int(table["head_dim"]))
        checks.append(close(f"rope.cache.{key}", torch.stack((cos, sin)), want, 0.0))
    return checks


@torch.inference_mode()
def _vae_checks(vae, path: Path, device: torch.device) -> list[dict[str, Any]]:
    tf = torch.load(path, weights_only=True, map_location=device)
    img, tol = tf["vae_image"], TOL["image"] if device.type == "cpu" else 1e-3
    schedule = tuple((h, w) for _, h, w in tf["tf_image_clean"]["scale_schedule"])
    checks = [close("vae.encode", vae.encode_latent(img["image"]), img["raw_features"], TOL["recon"])]
    bits, f = vae.encode_bits(img["raw_features"], schedule)
    exact = device.type == "cpu"  # CUDA convolutions round otherwise: agreement is reported there
    checks.append(token_check("vae.msbsq_bits", bits, [b.cpu() for b in img["msbsq_bits"]], exact))
    checks.append(close("vae.msbsq_z", f, img["msbsq_z"], tol))
    checks.append(close("vae.decode", vae.decode(img["msbsq_z"]), img["recon"], tol))
    for key, flipped in (("tf_image_clean", None), ("tf_image_bsc", tf["tf_image_bsc"]["noisy_bits"])):
        labels, x_in = vae.teacher_inputs(img["raw_features"], schedule, flipped)
        checks.append(token_check(f"vae.{key}.labels", labels, [b.cpu() for b in tf[key]["gt_bits"]], exact))
        checks.append(close(f"vae.{key}.inputs", x_in, tf[key]["x_BLC_wo_prefix"], tol))
    return checks


@torch.inference_mode()
def _teacher_forcing_checks(variant, path: Path, text: dict, sub: str, tol: float,
                            device: torch.device) -> list[dict[str, Any]]:
    from varbench.variants.infinity_model import pack_text

    tf = torch.load(path, weights_only=True, map_location=device)
    prompt, mask = pack_text([text["prompt_A"].to(device)])
    return [close(f"{sub}.teacher_forced.{key}", variant.teacher_forced(prompt, mask, tf[key]["x_BLC_wo_prefix"]),
                  tf[key]["logits"], tol) for key in ("tf_from_A", "tf_image_clean", "tf_image_bsc")]


class _RecordRaw:
    """Wraps a variant and keeps each step's raw head logits (before tau and guidance)."""

    def __init__(self, inner):
        self.inner, self.raw = inner, []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def forward(self, state, step):
        out = self.inner.forward(state, step)
        self.raw.append(out.logits.clone())
        return out


def _uint8_bgr(images: Tensor) -> Tensor:
    return (images * 255).to(torch.uint8).permute(0, 2, 3, 1).flip(-1).cpu()


def _free_run_checks(variant, run: dict, sampling: SampleConfig, name: str, exact: bool,
                     tol: float) -> list[dict[str, Any]]:
    recorder = _RecordRaw(variant)
    out = generate(recorder, torch.tensor([0]), sampling, g_seed=int(run["args"]["gen_one_img"]["g_seed"]))
    want = [b.reshape(b.shape[0], -1, b.shape[-1]).long().cpu() for b in run["bits"]]
    checks = [token_check(f"{name}.bits", out.state.bits, want, exact)]
    if exact:  # logits are comparable scale by scale only while the bits agree
        worst = max(close("", got, w, tol)["max_abs_err"] for got, w in zip(recorder.raw, run["raw_logits"]))
        checks.append({"check": f"{name}.raw_logits", "max_abs_err": worst, "tol": tol, "pass": worst <= tol})
        # The decoder's convolutions sum in a thread-count-dependent order (the fixture is exact at 2 threads,
        # README): the image is held to the fp32 reconstruction tolerance, and to one uint8 level.
        want = run["decoder_out"].clamp(-1, 1).add(1).div(2)
        checks.append(close(f"{name}.image", out.images, want, TOL["recon"]))
        err = int((_uint8_bgr(out.images).int() - run["img_uint8_bgr"].int().cpu()).abs().max())
        checks.append({"check": f"{name}.image_uint8", "max_abs_err": err, "tol": 1, "pass": err <= 1})
    return checks


def _decision_margins(logits: Tensor, noise: Tensor, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """Per bit (rows of (n, 2) guided logits and Exp(1) noise): the logit margin that decides the draw, and how
    far the minority probability is from the top-p cut (inf where the cut is off)."""
    diff = logits[:, 1] - logits[:, 0]
    if top_k == 1:
        return diff.abs(), torch.full_like(diff, torch.inf)
    decision = (diff - (noise[:, 1].log() - noise[:, 0].log())).abs()
    p_minor = logits.softmax(-1).amin(-1)
    cut = (p_minor - (1 - top_p)).abs() if top_p > 0 else torch.full_like(diff, torch.inf)
    dropped = (p_minor <= 1 - top_p) if top_p > 0 else torch.zeros_like(diff, dtype=torch.bool)
    return torch.where(dropped, diff.abs(), decision), cut


@torch.inference_mode()
def _replay_checks(variant, run: dict, sampling: SampleConfig, name: str, tol: float,
                   on_cpu: bool) -> list[dict[str, Any]]:
    """Each scale on the official trajectory: logits against the recorded ones, then the bits drawn with the
    recorded noise, compared where the decision is wider than the logit error; the recorded bits are committed."""
    state = variant.start(torch.tensor([0], device=variant.device), sampling)
    checks, worst, mismatches, skipped, total = [], 0.0, 0, 0, 0
    for step in variant.steps():
        si, s = step.si, sampling.at(step.si)
        out = variant.forward(state, step)
        scaled = out.logits.mul(1 / s.temperature)
        pairs = (guide_bits(scaled, sampling.cfg_at(si)) if out.guided else scaled).reshape(1, -1, 2)
        want_logits, noise = run["logits"][si], run["noise"][si]
        worst = max(worst, close("", out.logits, run["raw_logits"][si], tol)["max_abs_err"])
        err = close("", pairs, want_logits, tol)["max_abs_err"]  # guidance and 1/tau amplify the raw error
        filtered = filter_top_k_top_p_(pairs.clone(), s.top_k, s.top_p)[0]
        ours = (filtered.softmax(-1) / noise).argmax(-1)
        want_bits = run["bits"][si].reshape(-1).long()
        decision, cut = _decision_margins(want_logits[0].float(), noise.float(), s.top_k, s.top_p)
        fair = (decision > 2 * err) & (cut > err)
        mismatches += int((ours != want_bits)[fair].sum())
        skipped += int((~fair).sum())
        total += want_bits.numel()
        h, w = variant.schedule[si]
        official = Draw(want_bits.view(1, h * w, -1), pairs, None)
        variant.commit(state, step, official)
        if si + 1 < len(variant.schedule):
            checks.append(close(f"{name}.replay.next_input.scale{si}", variant.net.embed_input(
                run["next_input"][si]), state.x[:1], TOL["var_input"]))
    checks.append({"check": f"{name}.replay.raw_logits", "max_abs_err": worst, "tol": tol, "pass": worst <= tol})
    checks.append({"check": f"{name}.replay.bits", "mismatches": mismatches, "compared": total - skipped,
                   "skipped_within_logit_error": skipped, "pass": mismatches == 0 or not on_cpu})
    return checks
