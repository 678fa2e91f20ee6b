"""Conformance of VAR: replays a fixture folder of the official VAR code (teacher-forced logits, the VQVAE
paths, sampled runs) against this implementation, in reference and engine modes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import SampleConfig

from .common import CUDA_LOGITS_TOL, SMOOTH_IMAGE_MEAN_TOL, TOL, RecordGuided, close, close_on_average, token_check

__all__ = ["check_var_folder"]


def check_var_folder(folder: Path, meta: dict, device: torch.device) -> list[dict[str, Any]]:
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
        checks.append(close("vq.tokens_to_var_input", x_in, tf["x_BLCv_wo_first_l"], TOL["var_input"]))
        img = vae.decode(vae.tokens_to_fhat(tf["gt_idx_Bl"], pn))
        checks.append(close("vq.tokens_to_image", img, tf["img_from_gt_idx"], TOL["image"] if on_cpu else 1e-3))
        if "enc_input_img" in tf:
            enc = vae.encode_tokens(tf["enc_input_img"], pn)
            checks.append(token_check("vq.encode_tokens", enc, [t.cpu() for t in tf["enc_idx_Bl"]], on_cpu))
            recon = vae.decode(vae.tokens_to_fhat(enc, pn))
            checks.append(close("vq.reconstruction", recon, tf["enc_recon_img"], TOL["recon"] if on_cpu else 1e-3))
        logits = net(tf["label_B"], tf["x_BLCv_wo_first_l"])
        checks.append(close("var.teacher_forced_logits", logits[:, tf["logits_positions"]],
                             tf["logits_BPV_at_positions"], logits_tol))
        checks.append(token_check("var.teacher_forced_argmax", [logits.argmax(-1)], [tf["tf_argmax_BL"].cpu()], on_cpu))

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
            recorder = RecordGuided(variant, sampling.cfg)
            out = generate(recorder, run["label_B"], sampling, g_seed=int(run["g_seed"]))
            name = prefix + run_file.stem
            checks.append(token_check(f"{name}.tokens", out.tokens, want_tokens, on_cpu))
            if on_cpu and sampling.more_smooth:
                checks.append(close_on_average(f"{name}.image", out.images, run["img_B3HW_01"],
                                                SMOOTH_IMAGE_MEAN_TOL))
            elif on_cpu:
                checks.append(close(f"{name}.image", out.images, run["img_B3HW_01"],
                                     TOL["image"] if not prefix else TOL["recon"]))
            for si, want in enumerate(run.get("cfg_logits_BlV_first_6_scales", []) if not prefix else []):
                checks.append(close(f"{name}.cfg_logits.scale{si}", recorder.logits[si], want, logits_tol))
    return checks
