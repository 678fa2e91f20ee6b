"""Replays an HMAR conformance folder (reference outputs of the official NVlabs/HMAR@595a9df code).

Format: conformance/hmar_d2/README.md and meta.json; algorithm: docs/HMAR_SPEC.md. Checked: the strict load and
parameter counts; the teacher-forced inputs of both paths and their logits/argmax under Markov (block-diagonal)
attention, with the block-sparse kernel dispatch and with masked SDPA; and every gen_*.pt run regenerated under
three engine settings (NCHW decode, full engine, reference loop): the tokens of every scale, each sampler call of
the masked scales (drawn tokens, masked positions in their confidence order, the map after the call), the guided
logits of scales 0-2 and the image.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from varbench.harness.core.hashing import file_sha256
from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import SampleConfig

from .common import CUDA_LOGITS_TOL, TOL, RecordGuided, close, token_check

__all__ = ["check_hmar_folder"]


class _RecordHMAR(RecordGuided):
    """Also keeps, per sampler call: (si, step, drawn tokens, token map after the call)."""

    def __init__(self, inner, cfg: float):
        super().__init__(inner, cfg)
        self.calls: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def commit(self, state, step, draw):
        drawn = draw.tokens.clone()
        self.inner.commit(state, step, draw)
        after = state.idx if state.idx is not None else state.tokens[-1]
        self.calls.append((step.si, step.sub, drawn.cpu(), after.clone().cpu()))


def _same(name: str, got: torch.Tensor | None, want: torch.Tensor | None) -> dict[str, Any]:
    ok = (got is None and want is None) or (got is not None and want is not None and got.shape == want.shape
                                            and bool((got.cpu() == want.cpu()).all()))
    return {"check": name, "pass": ok}


def _trace_checks(name: str, rec: _RecordHMAR, state, schedule, trace: list[dict]) -> list[dict[str, Any]]:
    """The fixture's mask_trace: every sampler call on scales that have masked steps, in call order."""
    calls = [c for c in rec.calls if len(schedule[c[0]]) > 1]
    masks = {(si, sub): m for si, sub, m in state.mask_trace}
    checks = [{"check": f"{name}.mask_trace.calls", "got": [c[:2] for c in calls],
               "want": [(e["si"], e["step"]) for e in trace],
               "pass": [c[:2] for c in calls] == [(e["si"], e["step"]) for e in trace]}]
    for (si, sub, drawn, after), e in zip(calls, trace):
        tag = f"{name}.mask_trace.s{si}_step{sub}"
        checks.append(_same(f"{tag}.idx_sampled", drawn, e["idx_sampled"]))
        checks.append(_same(f"{tag}.idx_to_mask", masks.get((si, sub)), e["idx_to_mask"]))
        checks.append(_same(f"{tag}.idx_after", after, e["idx_Bl_after"]))
    return checks


def check_hmar_folder(folder: Path, meta: dict, device: torch.device) -> list[dict[str, Any]]:
    """Every comparison of an HMAR fixture folder, as report entries {"check", ..., "pass"}."""
    from varbench.variants.hmar import HMAR, load_hmar_net, mask_token_input
    from varbench.variants.loading import load_vqvae
    from varbench.variants.var import EngineConfig

    folder = Path(folder)
    on_cpu = device.type == "cpu"
    logits_tol = TOL["logits"] if on_cpu else CUDA_LOGITS_TOL
    depth = meta["depth"]
    net = load_hmar_net(folder / f"hmar_d{depth}.pth", expect_depth=depth, patch_nums=meta.get("pn"))
    vae_path = folder.parent / "var_d2" / "vae.pth"  # not copied into the folder (README)
    vae = load_vqvae(vae_path)
    sd = net.state_dict()
    checks = [
        {"check": "vae.sha256", "pass": file_sha256(vae_path) == meta["vae_ckpt_sha256"]},
        {"check": "hmar_params", "got": sum(p.numel() for p in net.parameters()), "want": meta["hmar_params"]},
        {"check": "vae_params", "got": sum(p.numel() for p in vae.parameters()), "want": meta["vae_params"]},
        {"check": "hmar_state_dict_entries", "got": len(sd), "want": meta["hmar_state_dict_entries"]},
        {"check": "hmar_state_dict_numel", "got": sum(t.numel() for t in sd.values()),
         "want": meta["hmar_state_dict_numel_incl_buffers"]},
        {"check": "n_base_blocks", "got": net.cfg.n_base, "want": meta["n_base_blocks"]},
    ]
    for c in checks[1:]:
        c["pass"] = c["got"] == c["want"]
    net, vae = net.to(device), vae.to(device)
    pn = net.cfg.patch_nums

    tf = torch.load(folder / "teacher_forced.pt", weights_only=True, map_location=device)
    with torch.inference_mode():
        checks.append(close("vq.tokens_to_ns_input", vae.tokens_to_var_input(tf["gt_idx_Bl"], pn),
                             tf["x_ns_BLCv_wo_first_l"], TOL["var_input"]))
        checks.append(close("vq.tokens_to_mask_input", mask_token_input(vae, tf["gt_idx_Bl"], pn),
                             tf["x_mask_BLCv_wo_first_l"], TOL["var_input"]))
        per_scale = torch.cat(tf["idx_to_mask_per_scale"])
        checks.append(_same("mask_positions_per_scale", per_scale, tf["idx_to_mask_wo_first_l"]))
        for impl in ("auto", "sdpa"):
            ns = net(tf["label_B"], tf["x_ns_BLCv_wo_first_l"], attn_impl=impl)
            masked = net(tf["label_B"], tf["x_ns_BLCv_wo_first_l"], tf["x_mask_BLCv_wo_first_l"],
                         tf["idx_to_mask_wo_first_l"], attn_impl=impl)
            for path, logits in (("ns", ns), ("mask", masked)):
                name = f"hmar.teacher_forced.{impl}.{path}"
                checks.append(close(f"{name}_logits", logits[:, tf[f"{path}_logits_positions"]],
                                     tf[f"{path}_logits_BPV_at_positions"], logits_tol))
                checks.append(token_check(f"{name}_argmax", [logits.argmax(-1)], [tf[f"{path}_tf_argmax_BL"].cpu()],
                                      on_cpu))

    engines = {"": EngineConfig("fp32", channels_last_vae=False), "engine.": EngineConfig("fp32"),
               "reference.": EngineConfig.reference()}
    for run_file in sorted(folder.glob("gen_*.pt")):
        run = torch.load(run_file, weights_only=True, map_location=device)
        kw = run["kwargs"]
        sampling = SampleConfig(cfg=float(run["cfg"]), top_k=int(kw["top_k"]), top_p=float(kw["top_p"]),
                                more_smooth=bool(kw.get("more_smooth", False)))
        schedule = kw["mask_schedule"] if kw.get("mask", True) else "none"
        want_tokens = [t.cpu() for t in run["idx_Bl_per_scale"]]
        for prefix, engine in engines.items():
            variant = HMAR(copy.deepcopy(net), copy.deepcopy(vae), engine, device, mask_schedule=schedule)
            rec = _RecordHMAR(variant, sampling.cfg)
            out = generate(rec, run["label_B"], sampling, g_seed=int(run["g_seed"]))
            name = prefix + run_file.stem
            checks.append(token_check(f"{name}.tokens", out.tokens, want_tokens, on_cpu))
            kv = out.state.kv_bytes
            checks.append({"check": f"{name}.kv_bytes", "got": max(kv), "pass": len(kv) == len(pn) and not any(kv)})
            if on_cpu:  # the random stream is device-specific
                checks += _trace_checks(name, rec, out.state, variant.schedule, run["mask_trace"])
                checks.append(close(f"{name}.image", out.images, run["img_B3HW_01"],
                                     TOL["image"] if not prefix else TOL["recon"]))
            for i, call in enumerate(run.get("cfg_logits_calls_scales_0_2", []) if not prefix else []):
                if not on_cpu and i:  # later calls depend on draws, which differ off the CPU stream
                    break
                steps = [(c[0], c[1]) for c in rec.calls]
                checks.append({"check": f"{name}.cfg_logits.call{i}.order",
                               "pass": steps[i] == (call["si"], call["step"])})
                checks.append(close(f"{name}.cfg_logits.s{call['si']}_step{call['step']}", rec.logits[i],
                                     call["logits"], logits_tol))
    return checks
