"""Replays a conformance fixture folder (reference outputs of the official code) against this implementation.

Format: docs/../conformance/README.md. Every comparison becomes one entry of the report with its error and
tolerance; the folder passes only if every entry passes. On CPU in fp32 tokens must match exactly; on CUDA
the random stream differs from the CPU's, so logits are compared within a looser tolerance and the token
agreement rate is reported instead of required.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .loop import generate
from .sampling import SampleConfig, guide

__all__ = ["run_conformance", "fixture_kind", "TOL", "CUDA_LOGITS_TOL"]

# fp32 tolerances (absolute) on CPU, from the fixture README; CUDA fp32 (TF32 off) gets LOOSE for logits.
TOL = {"logits": 1e-4, "var_input": 1e-5, "image": 1e-5, "recon": 1e-4}
CUDA_LOGITS_TOL = 2e-3
# more_smooth mixes codebook rows with a Gumbel softmax at tau down to 0.0135 on logits x2, which amplifies
# fp32 rounding (it depends on the CPU's SIMD kernels) about 150x. The official code itself, run with the
# fixture's torch 2.13 on an AMD EPYC (AVX2), misses the fixture's smooth image by 0.0245 max / 4.8e-4 mean
# abs; with ATEN_CPU_CAPABILITY=default, 0.20 max / 5.8e-3 mean. So that image is held to its MEAN abs error:
# a wrong smoothing (none, or another Gumbel draw) is off by about 0.25 mean.
SMOOTH_IMAGE_MEAN_TOL = 2e-2


def _close(name: str, got: Tensor, want: Tensor, tol: float) -> dict[str, Any]:
    err = (got.detach().float().cpu() - want.float()).abs().max().item() if got.shape == want.shape else float("inf")
    return {"check": name, "max_abs_err": err, "tol": tol, "pass": err <= tol}


def _close_on_average(name: str, got: Tensor, want: Tensor, tol: float) -> dict[str, Any]:
    """Like _close but passes on the mean abs error (the max is reported): for ill-conditioned outputs."""
    err = (got.detach().float().cpu() - want.float()).abs() if got.shape == want.shape else torch.full((1,), torch.inf)
    return {"check": name, "max_abs_err": err.max().item(), "mean_abs_err": err.mean().item(),
            "tol_mean": tol, "pass": err.mean().item() <= tol}


def _tokens(name: str, got: list[Tensor], want: list[Tensor], required: bool) -> dict[str, Any]:
    total = sum(w.numel() for w in want)
    same = sum(int((g.cpu() == w).sum()) for g, w in zip(got, want) if g.shape == w.shape)
    entry = {"check": name, "mismatches": total - same, "agreement": same / total, "pass": True}
    if required:
        entry["pass"] = same == total
    return entry


class _RecordGuided:
    """Wraps a variant and keeps a copy of each step's guided logits before the sampler filters them."""

    def __init__(self, inner, cfg: float):
        self.inner, self.cfg, self.logits = inner, cfg, []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def forward(self, state, step):
        out = self.inner.forward(state, step)
        self.logits.append(guide(out.logits, self.cfg * step.cfg_ratio).clone())
        return out


def _check_var_folder(folder: Path, meta: dict, device: torch.device) -> list[dict[str, Any]]:
    from varbench.variants.loading import load_var_net, load_vqvae
    from varbench.variants.var import VAR, EngineConfig

    on_cpu = device.type == "cpu"
    depth = meta["depth"]
    net = load_var_net(folder / f"var_d{depth}.pth", expect_depth=depth, patch_nums=meta.get("pn"))
    vae = load_vqvae(folder / "vae.pth")
    pn = net.cfg.patch_nums
    checks = [
        {"check": "var_params", "got": sum(p.numel() for p in net.parameters()), "want": meta["var_params"]},
        {"check": "vae_params", "got": sum(p.numel() for p in vae.parameters()), "want": meta["vae_params"]},
    ]
    for c in checks:
        c["pass"] = c["got"] == c["want"]
    net, vae = net.to(device), vae.to(device)
    logits_tol = TOL["logits"] if on_cpu else CUDA_LOGITS_TOL

    tf = torch.load(folder / "teacher_forced.pt", weights_only=True, map_location=device)
    with torch.inference_mode():
        x_in = vae.tokens_to_var_input(tf["gt_idx_Bl"], pn)
        checks.append(_close("vq.tokens_to_var_input", x_in, tf["x_BLCv_wo_first_l"], TOL["var_input"]))
        img = vae.decode(vae.tokens_to_fhat(tf["gt_idx_Bl"], pn))
        checks.append(_close("vq.tokens_to_image", img, tf["img_from_gt_idx"], TOL["image"] if on_cpu else 1e-3))
        if "enc_input_img" in tf:
            enc = vae.encode_tokens(tf["enc_input_img"], pn)
            checks.append(_tokens("vq.encode_tokens", enc, [t.cpu() for t in tf["enc_idx_Bl"]], on_cpu))
            recon = vae.decode(vae.tokens_to_fhat(enc, pn))
            checks.append(_close("vq.reconstruction", recon, tf["enc_recon_img"], TOL["recon"] if on_cpu else 1e-3))
        logits = net(tf["label_B"], tf["x_BLCv_wo_first_l"])
        checks.append(_close("var.teacher_forced_logits", logits[:, tf["logits_positions"]],
                             tf["logits_BPV_at_positions"], logits_tol))
        checks.append(_tokens("var.teacher_forced_argmax", [logits.argmax(-1)], [tf["tf_argmax_BL"].cpu()], on_cpu))

    # The fixture's image tolerance (1e-5) holds for NCHW convolutions; the engine's NHWC decode sums in another
    # order (about 3e-5 on [0, 1] images), so the full engine is checked too, with tokens exact and 1e-4.
    runs = {"": VAR(net, vae, EngineConfig("fp32", channels_last_vae=False), device)}
    runs["engine."] = VAR(copy.deepcopy(net), copy.deepcopy(vae), EngineConfig("fp32"), device)
    for run_file in sorted(folder.glob("ar_*.pt")):
        run = torch.load(run_file, weights_only=True, map_location=device)
        kw = run["kwargs"]
        sampling = SampleConfig(cfg=float(run["cfg"]), top_k=int(kw.get("top_k", 0)), top_p=float(kw.get("top_p", 0.0)),
                                more_smooth=bool(kw.get("more_smooth", False)))
        want_tokens = [t.cpu() for t in run["idx_Bl_per_scale"]]
        for prefix, variant in runs.items():
            recorder = _RecordGuided(variant, sampling.cfg)
            out = generate(recorder, run["label_B"], sampling, g_seed=int(run["g_seed"]))
            name = prefix + run_file.stem
            checks.append(_tokens(f"{name}.tokens", out.tokens, want_tokens, on_cpu))
            if on_cpu and sampling.more_smooth:
                checks.append(_close_on_average(f"{name}.image", out.images, run["img_B3HW_01"],
                                                SMOOTH_IMAGE_MEAN_TOL))
            elif on_cpu:
                checks.append(_close(f"{name}.image", out.images, run["img_B3HW_01"],
                                     TOL["image"] if not prefix else TOL["recon"]))
            for si, want in enumerate(run.get("cfg_logits_BlV_first_6_scales", []) if not prefix else []):
                checks.append(_close(f"{name}.cfg_logits.scale{si}", recorder.logits[si], want, logits_tol))
    return checks


def fixture_kind(folder: Path, meta: dict) -> str | None:
    """Which official code a fixture folder records: "var", "code" (drafter/refiner) or "hmar"."""
    if "drafter" in meta:
        return "code"
    if any(folder.glob("hmar_d*.pth")):
        return "hmar"
    if {"depth", "vae_ch", "pn"} <= set(meta) and (folder / f"var_d{meta['depth']}.pth").is_file():
        return "var"
    return None


def run_conformance(folder: str | Path, device: str = "cpu") -> dict[str, Any]:
    """Replays every comparison of a fixture folder; returns {"folder", "device", "passed", "checks"}."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a conformance fixture folder (no meta.json)")
    meta = json.loads(meta_path.read_text())
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fixtures are fp32 without TF32
        torch.backends.cudnn.allow_tf32 = False
    kind = fixture_kind(folder, meta)
    if kind == "var":
        checks = _check_var_folder(folder, meta, dev)
    elif kind == "code":
        from .conformance_code import check_code_folder

        checks = check_code_folder(folder, meta, dev)
    elif kind == "hmar":
        from .conformance_hmar import check_hmar_folder

        checks = check_hmar_folder(folder, meta, dev)
    else:
        raise ValueError(f"{folder}: unsupported fixture kind (supported: the VAR format of conformance/var_d2, "
                         "CoDe's code_d3_d2 and HMAR's hmar_d2)")
    return {"folder": str(folder), "device": str(dev), "passed": all(c["pass"] for c in checks), "checks": checks}
