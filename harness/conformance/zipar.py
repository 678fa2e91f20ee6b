"""Conformance of ZipAR (variants/accel/zipar.py): replays ../conformance/zipar_tiny, the tokens of the official
ZipAR c2i sampler (ThisisBillhe/ZipAR@2a5695ca generate_zipar.py; window 0: its plain generate.py) on the tiny
LlamaGen weights of ../conformance/llamagen_tiny, through varbench's LlamaGen with the `zipar` acceleration in
engine and reference modes. Per run: every token (raster order), the post-CFG logits of every sampled position
in the official sampling order, and the number of network calls (the official forward count, prefill included).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import SampleConfig

from .common import CUDA_LOGITS_TOL, close, token_check
from .llamagen import LOGITS_TOL, RecordRaster

__all__ = ["check_zipar_folder", "find_llamagen_weights"]


def find_llamagen_weights(folder: Path) -> Path:
    """The fixture's weights live in its sibling llamagen_tiny/ (meta "weights"), not copied."""
    path = folder.parent / "llamagen_tiny"
    if not (path / "gpt_state_dict.pt").is_file():
        raise FileNotFoundError(f"{folder}: the ZipAR fixture reads its weights from {path}, which is missing")
    return path


def _variants(weights: Path, device: torch.device) -> dict[str, Any]:
    from varbench.variants.engine import EngineConfig
    from varbench.variants.llamagen import LlamaGen
    from varbench.variants.llamagen_loading import load_llamagen_net, load_llamagen_vq

    net = load_llamagen_net(weights / "gpt_state_dict.pt", 256, 16, n_head=2)
    vq = load_llamagen_vq(weights / "vq_state_dict.pt")
    net, vq = net.to(device), vq.to(device)
    return {"": LlamaGen(net, vq, EngineConfig.reference(), device, "reference"),
            "engine.": LlamaGen(copy.deepcopy(net), copy.deepcopy(vq), EngineConfig("fp32"), device, "engine")}


def _replay(variant, run: dict, device: torch.device) -> tuple[Any, RecordRaster, dict[str, Any]]:
    """One generation of `variant` under ZipAR at the run's window and sampling."""
    from varbench.variants.accel import accel_report, apply_acceleration

    kw = run["kwargs"]
    sampling = SampleConfig(cfg=float(kw["cfg_scale"]), top_k=int(kw["top_k"]), top_p=float(kw["top_p"]),
                            temperature=float(kw["temperature"]))
    variant.cfg_interval = float(kw["cfg_interval"])
    apply_acceleration(variant, "zipar", window=int(run["window"]))
    try:
        recorder = RecordRaster(variant, sampling.cfg, decode=False)
        out = generate(recorder, run["labels"].to(device), sampling, g_seed=int(run["gen_seed"]))
        report = accel_report(variant, out.state)
    finally:
        apply_acceleration(variant, None)
        variant.cfg_interval = -1
    return out, recorder, report


def check_zipar_folder(folder: Path, meta: dict, device: torch.device) -> list[dict[str, Any]]:
    on_cpu = device.type == "cpu"
    runs = _variants(find_llamagen_weights(folder), device)
    logits_tol = LOGITS_TOL if on_cpu else CUDA_LOGITS_TOL
    checks: list[dict[str, Any]] = []
    for run_file in sorted(folder.glob("gen_*.pt")):
        run = torch.load(run_file, weights_only=True, map_location=device)
        name = run_file.stem[len("gen_"):]
        cfg = float(run["kwargs"]["cfg_scale"])
        for prefix, variant in runs.items():
            out, recorder, report = _replay(variant, run, device)
            checks.append(token_check(f"{prefix}{name}.tokens", out.tokens, [run["tokens"].long().cpu()], on_cpu))
            guided = torch.cat([g.float() for g in recorder.guided], dim=1)  # (B, 256, V) in sampling order
            amplified = logits_tol * max(1.0, 2 * cfg - 1)  # CFG scales a raw-logit error up to (2·cfg − 1)
            checks.append(close(f"{prefix}{name}.post_cfg_logits", guided, run["sample_logits_in"], amplified))
            evals = report.get("network_evals", len(recorder.guided))
            checks.append({"check": f"{prefix}{name}.network_calls", "got": evals, "want": run["network_calls"],
                           "pass": evals == run["network_calls"]})
    return checks
