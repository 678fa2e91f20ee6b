"""Conformance: replays a fixture folder (reference outputs of the official code) against this implementation.

Format: docs/../conformance/README.md. Every comparison becomes one entry of the report with its error and
tolerance; the folder passes only if every entry passes. On CPU in fp32 tokens must match exactly; on CUDA
the random stream differs from the CPU's, so logits are compared within a looser tolerance and the token
agreement rate is reported instead of required. One checker per family (var.py, code.py, hmar.py, llamagen.py,
infinity.py, and the accelerations litevar.py, zipar.py) over the shared comparisons of common.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .code import check_code_folder
from .common import CUDA_LOGITS_TOL, TOL, RecordGuided
from .hmar import check_hmar_folder
from .infinity import check_infinity_folder
from .litevar import check_litevar_folder
from .llamagen import check_llamagen_folder
from .var import check_var_folder
from .zipar import check_zipar_folder

__all__ = ["run_conformance", "fixture_kind", "TOL", "CUDA_LOGITS_TOL", "RecordGuided", "CHECKERS"]

CHECKERS = {"var": check_var_folder, "code": check_code_folder, "hmar": check_hmar_folder,
            "llamagen": check_llamagen_folder, "infinity": check_infinity_folder, "litevar": check_litevar_folder,
            "zipar": check_zipar_folder}


def fixture_kind(folder: Path, meta: dict) -> str | None:
    """Which official code a fixture folder records: "var", "code" (drafter/refiner), "hmar", "llamagen",
    "infinity", "litevar" (a VAR acceleration) or "zipar" (a LlamaGen acceleration)."""
    if "litevar" in meta:
        return "litevar"
    if "zipar" in meta:  # a LlamaGen acceleration; its weights sit in ../llamagen_tiny
        return "zipar"
    if "drafter" in meta:
        return "code"
    if "gpt_cfg" in meta and (folder / "gpt_state_dict.pt").is_file():
        return "llamagen"
    if any(folder.glob("hmar_d*.pth")):
        return "hmar"
    if (folder / "infinity_tiny.pth").is_file():
        return "infinity"
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
    if kind not in CHECKERS:
        raise ValueError(f"{folder}: unsupported fixture kind (supported: the formats of conformance/var_d2 (VAR), "
                         "code_d3_d2 (CoDe), hmar_d2 (HMAR), llamagen_tiny (LlamaGen), infinity_tiny (Infinity), "
                         "litevar_d2 (LiteVAR) and zipar_tiny (ZipAR))")
    checks = CHECKERS[kind](folder, meta, dev)
    return {"folder": str(folder), "device": str(dev), "passed": all(c["pass"] for c in checks), "checks": checks}
