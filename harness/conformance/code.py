"""Replays a CoDe conformance folder (reference outputs of the official czg1225/CoDe@bfb204de inference).

Format: conformance/code_d3_d2/README.md and meta.json; algorithm: docs/CODE_SPEC.md. Every run file
(draft steps N = 6 and 8, greedy and the FID-script sampling) is regenerated with `variants.code.CoDe` under
three engine settings (the engine with an NCHW decode, the full engine, the reference loop), and compared
with: the tokens of every scale (exact on CPU), the random-stream consumption order recorded by the fixture
author (`calls`), the refiner's discarded draws, the handover inputs (token hub) and f_hat, the refiner's
guided handover logits, the final f_hat and the image (stored as float16, hence its 1e-3 tolerance).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from varbench.harness.core.hashing import file_sha256
from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import SampleConfig, draw_tokens, guide

from .common import CUDA_LOGITS_TOL, TOL, RecordGuided, close, token_check

__all__ = ["check_code_folder"]

# The README's image tolerance: images are stored as float16 (≤ 2.44e-4) and the VQVAE convolutions move by one
# fp16 step between 1 and 2 CPU threads.
IMAGE_TOL = 1e-3


class _RecordCoDe(RecordGuided):
    """Also keeps, before the loop filters them in place: the sampling calls in order (stream, shape, top-k,
    top-p, as meta.json's `calls`), the discarded logits, and the drafter's hand-over (token hub, f_hat)."""

    def __init__(self, inner, sampling: SampleConfig):
        super().__init__(inner, sampling.cfg)
        self.sampling, self.calls, self.discards = sampling, [], []
        self.hub: Tensor | None = None
        self.draft_f_hat: Tensor | None = None

    def _call(self, who: str, si: int, shape: tuple[int, ...]) -> None:
        s = self.sampling.at(si)
        self.calls.append(f"{who}:{tuple(shape)}:k={s.top_k},p={s.top_p}")

    def forward(self, state, step):
        if step.si == self.inner.draft_steps:
            self.hub = torch.cat([x.flatten(2).transpose(1, 2) for x in state.hub], dim=1).clone()
            self.draft_f_hat = state.drafter.f_hat.clone()
        out = super().forward(state, step)
        who = "draft" if step.stream == "drafter" else "refine"
        for si, logits in out.discard:
            self.discards.append((si, logits.clone()))
            self._call(who, si, logits.shape)
        self._call(who, step.si, self.logits[-1].shape)
        return out


def _replay_discards(discards: list[tuple[int, Tensor]], sampling: SampleConfig, g_seed: int,
                     device: torch.device, last: int) -> list[Tensor]:
    """The refiner's thrown-away tokens: its stream restarts at g_seed and draws scales 0..N-1 first."""
    gen = torch.Generator(device=device).manual_seed(g_seed)
    return [draw_tokens(logits.clone(), sampling.at(si), gen, si / last).tokens.cpu() for si, logits in discards]


def check_code_folder(folder: Path, meta: dict, device: torch.device) -> list[dict[str, Any]]:
    """Every comparison of a CoDe fixture folder, as report entries {"check", ..., "pass"}."""
    from varbench.variants.code import CoDe
    from varbench.variants.loading import load_var_net, load_vqvae
    from varbench.variants.var import VAR, EngineConfig

    folder = Path(folder)
    on_cpu = device.type == "cpu"
    logits_tol = TOL["logits"] if on_cpu else CUDA_LOGITS_TOL
    files = {role: folder / meta[role]["file"] for role in ("drafter", "refiner", "vae")}
    checks = [{"check": f"{role}.sha256", "pass": file_sha256(path) == meta[role]["sha256"]}
              for role, path in files.items()]
    pn = meta.get("patch_nums")
    # the drafter file stores float16 tensors whose values are the fp32 weights (README): compute in fp32
    drafter = load_var_net(files["drafter"], expect_depth=meta["drafter"]["depth"], patch_nums=pn).float()
    refiner = load_var_net(files["refiner"], expect_depth=meta["refiner"]["depth"], patch_nums=pn).float()
    vae = load_vqvae(files["vae"])
    for role, net in (("drafter", drafter), ("refiner", refiner)):
        checks.append({"check": f"{role}.width", "got": net.cfg.width, "want": meta[role]["embed_dim"],
                       "pass": net.cfg.width == meta[role]["embed_dim"] and net.cfg.heads == meta[role]["num_heads"]})

    engines = {"": EngineConfig("fp32", channels_last_vae=False), "engine.": EngineConfig("fp32"),
               "reference.": EngineConfig.reference()}
    pairs = {}
    for prefix, engine in engines.items():  # own copies: the engine may change memory formats in place
        shared_vae = copy.deepcopy(vae)
        pairs[prefix] = (VAR(copy.deepcopy(drafter), shared_vae, engine, device, "drafter"),
                         VAR(copy.deepcopy(refiner), shared_vae, engine, device, "refiner"))
    drafter, refiner, vae = drafter.to(device), refiner.to(device), vae.to(device)

    for key, spec in meta["runs"].items():
        run = torch.load(folder / spec["file"], weights_only=True, map_location=device)
        n, kw = int(run["N"]), run["kwargs"]
        sampling = SampleConfig(cfg=float(run["cfg"]), top_k=tuple(int(k) for k in kw["top_k"]),
                                top_p=float(kw["top_p"]), temperature=tuple(float(t) for t in kw["temp"]))
        want_tokens = [t.cpu() for t in run["idx_Bl_per_scale"]]
        name = f"code_{key}"

        # README "How to use" 2: the refiner teacher-forced on the fixture's tokens, guided at scale N.
        with torch.inference_mode():
            pn = drafter.cfg.patch_nums
            begin, end = refiner.begin_ends[n]
            x_in = vae.tokens_to_var_input(run["idx_Bl_per_scale"], pn)  # (B, L - 1, Cvae)
            checks.append(close(f"{name}.token_hub_from_tokens", x_in[:, : end - 1], run["draft_token_hub_BLCv"],
                                 TOL["var_input"]))
            labels = run["label_B"]
            labels = torch.cat((labels, torch.full_like(labels, refiner.cfg.num_classes)))  # CFG halves
            both = refiner(labels, x_in.repeat(2, 1, 1))  # block-causal: scale N sees only the drafted inputs
            tf = guide(both[:, begin:end], sampling.cfg * n / (len(pn) - 1))
            checks.append(close(f"{name}.teacher_forced_handover_logits", tf, run["handover_cfg_logits_BlV"],
                                 logits_tol))

        for prefix, (d, r) in pairs.items():
            code = CoDe(d, r, n)
            rec = _RecordCoDe(code, sampling)
            out = generate(rec, run["label_B"], sampling, g_seed=int(run["g_seed"]))
            full = prefix + name
            checks.append(token_check(f"{full}.tokens", out.tokens, want_tokens, on_cpu))
            sources = [model for model, scales in code.stages() for _ in scales]
            checks.append({"check": f"{full}.sources", "pass": sources == list(run["source_per_scale"])})
            if on_cpu:  # the random stream is device-specific: the recorded consumption order is the CPU one
                want_calls = meta["checks"][key]["calls"]
                checks.append({"check": f"{full}.rng_calls", "got": len(rec.calls), "want": len(want_calls),
                               "pass": rec.calls == want_calls})
                discarded = _replay_discards(rec.discards, sampling, int(run["g_seed"]), device,
                                             len(code.patch_nums) - 1)
                checks.append(token_check(f"{full}.refiner_discarded", discarded,
                                      [t.cpu() for t in run["refiner_discarded_idx_per_scale"]], True))
                checks.append(close(f"{full}.image", out.images, run["img_B3HW_01"], IMAGE_TOL))
            checks.append(close(f"{full}.handover_cfg_logits", rec.logits[n], run["handover_cfg_logits_BlV"],
                                 logits_tol))
            checks.append(close(f"{full}.draft_token_hub", rec.hub, run["draft_token_hub_BLCv"], TOL["var_input"]))
            checks.append(close(f"{full}.draft_f_hat", rec.draft_f_hat, run["draft_f_hat_BChw"], TOL["var_input"]))
            checks.append(close(f"{full}.f_hat_final", out.state.f_hat, run["f_hat_final_BChw"], TOL["var_input"]))
            held = out.state.drafter.cache.nbytes()
            checks.append({"check": f"{full}.drafter_cache_freed", "got": held, "pass": held == 0})
    return checks
