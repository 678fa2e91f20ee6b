"""Makes the LiteVAR conformance fixture (conformance/litevar_d2/) by running the OFFICIAL LiteVAR sampler.

Usage: python results/conformance/make_litevar_fixture.py LITEVAR_SRC OUT_DIR [--var-fixture DIR]

LITEVAR_SRC is a work tree of EkaterinaXie/LiteVAR@176ee6a (e.g. `git archive HEAD | tar -x -C /tmp/litevar_src`);
its code is imported from there at run time, none of it is in this file. The models are the VAR-d2 + VQVAE
(ch 32) weights of conformance/var_d2/ (official layout). Everything runs on CPU in fp32 (no autocast, TF32 off).

What the official inference does (models/basic_var.py `SelfAttention.forward` -> models/mask_for_inference.py
`mask_inference`, selected by the command-line `--mode`): mode 0 is plain VAR; modes 1 and 2 multiply the
pre-softmax scores of query scales 3..9 by 0/1 masks loaded from `mask_list[k][block][head]` (k = 0..29, one per
(query scale, key scale) pair: 2, 3, 3, 4, 5, 6, 7 masked key scales at query scales 3..9); mode 2 also copies
the conditional rows' scores onto the unconditional rows (`attn[-8:] = attn[:8]`, written for batch 8).

The calibrated masks were never released (the code loads them from a private path), so this script feeds the
official code masks of the template shape its own calibration (models/ban_mini_token.py) produces:
`|i * n_k / n_q - j| < w` (i: query index in its scale of n_q tokens, j: key index in a scale of n_k tokens),
with one width rule for every block and head: w = max(1, round(WINDOW * n_k)), WINDOW = 0.25.

Patches, all made here at run time (the official files are not edited):
  1. sys.argv is set to `--model_depth 16 --mode M` while importing: three modules parse the command line at
     import time (model_depth only names private paths; the model is built with depth 2 explicitly).
  2. `models.caogao` and `models.dididi` are imported by models/mask_attn*.py and ban_mini_token.py but are not
     in the repository; empty stand-in modules with the four imported names (never called in modes 0-2).
  3. torch.load of the private mask files (`/mnt/public/.../save_window/beifen/mask_{k}.pth`, map_location
     cuda:0) at import of models/mask_for_inference.py returns None; `mask_list` is then filled with this
     script's masks. The mode globals `MODE` of models/basic_var.py and models/mask_for_inference.py are set per
     run (they are read at call time).
No `.cuda()` patch is needed: dist.py, VAR and mask_inference pick the CPU when CUDA is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path

import torch

PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
WINDOW = 0.25
# (query scale, key scales masked, in the order y1, y2, ... of mask_inference: own scale first)
MASKED = {3: (3, 2), 4: (4, 3, 2), 5: (5, 4, 3), 6: (6, 5, 4, 3), 7: (7, 6, 5, 4, 3), 8: (8, 7, 6, 5, 4, 3),
          9: (9, 8, 7, 6, 5, 4, 3)}
LABELS = [207, 360, 387, 974, 88, 979, 417, 1000]  # batch 8 (the official CFG share is written for 8); last: null
SAMPLING = {"cfg": 4.0, "top_k": 900, "top_p": 0.95, "more_smooth": False}  # demo_sample_batch.py's call
G_SEED = 0  # demo_sample_batch.py's seed
RUNS = {"gen_mode2_global_cfg": 2, "gen_mode1_masked": 1}


def band(n_q: int, n_k: int, w: int) -> torch.Tensor:
    """(n_q, n_k) bool: the template shape of ban_mini_token.py (own scale: n_k == n_q gives |i - j| < w)."""
    x, y = torch.meshgrid(torch.arange(n_q), torch.arange(n_k), indexing="ij")
    return torch.abs(x * n_k / n_q - y) < w


def make_masks() -> tuple[list[torch.Tensor], list[int]]:
    """The 30 masks in the official order k (query scale 3's own scale first) and their widths."""
    masks, widths = [], []
    for si, key_scales in MASKED.items():
        for sj in key_scales:
            n_q, n_k = PN[si] ** 2, PN[sj] ** 2
            w = max(1, round(WINDOW * n_k))
            masks.append(band(n_q, n_k, w))
            widths.append(w)
    assert len(masks) == 30
    return masks, widths


def _never_called(*args, **kwargs):
    raise RuntimeError("stand-in of a module absent from the LiteVAR repository; modes 0-2 never call it")


def import_official(src: Path, masks: list[torch.Tensor], depth: int, heads: int):
    sys.path.insert(0, str(src))
    sys.argv = [sys.argv[0], "--model_depth", "16", "--mode", "2"]  # patch 1
    for name, fns in (("caogao", ("slow_attn_diff", "slow_attn_diff2", "slow_attn_test")),
                      ("dididi", ("slow_attn_cal_dis",))):  # patch 2
        stub = types.ModuleType(f"models.{name}")
        for fn in fns:
            setattr(stub, fn, _never_called)
        sys.modules[f"models.{name}"] = stub
    real_load = torch.load

    def load(path, *args, **kwargs):  # patch 3
        if str(path).startswith("/mnt/public/"):
            return None
        return real_load(path, *args, **kwargs)

    torch.load = load
    try:
        import models
        import models.basic_var as basic_var
        import models.mask_for_inference as mfi
    finally:
        torch.load = real_load
    for k, m in enumerate(masks):
        per_head = [m.float().unsqueeze(0) for _ in range(heads)]  # official format: (1, n_q, n_k) per head
        mfi.mask_list[k] = {block: list(per_head) for block in range(depth)}
    return models, basic_var, mfi


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def record_tokens(var):
    """The sampled tokens of each scale: the input of the codebook lookup (a forward hook; more_smooth off)."""
    tokens: list[torch.Tensor] = []
    handle = var.vae_quant_proxy[0].embedding.register_forward_hook(lambda m, args, out: tokens.append(args[0].clone()))
    try:
        yield tokens
    finally:
        handle.remove()


def sample(var, mode: int, modules) -> dict:
    _, basic_var, mfi = modules
    basic_var.MODE = mfi.MODE = mode
    label_B = torch.tensor(LABELS)
    with record_tokens(var) as tokens, torch.inference_mode():
        img = var.autoregressive_infer_cfg(B=len(LABELS), label_B=label_B, g_seed=G_SEED, cfg=SAMPLING["cfg"],
                                           top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"],
                                           more_smooth=SAMPLING["more_smooth"])
    return {"img_B3HW_01": img.clone(), "idx_Bl_per_scale": tokens, "label_B": label_B, "cfg": SAMPLING["cfg"],
            "g_seed": G_SEED, "kwargs": {k: v for k, v in SAMPLING.items() if k != "cfg"}, "mode": mode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("litevar_src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--var-fixture", type=Path, default=Path(__file__).parents[2] / "../shared/conformance/var_d2")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(2)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    var_dir = args.var_fixture.resolve()
    var_meta = json.loads((var_dir / "meta.json").read_text())
    depth, heads = var_meta["depth"], var_meta["depth"]  # official build_vae_var: heads = depth
    masks, widths = make_masks()
    modules = import_official(args.litevar_src.resolve(), masks, depth, heads)
    vae, var = modules[0].build_vae_var(V=4096, Cvae=32, ch=var_meta["vae_ch"], share_quant_resi=4, device="cpu",
                                        patch_nums=PN, num_classes=1000, depth=depth, shared_aln=False)
    vae.load_state_dict(torch.load(var_dir / "vae.pth", map_location="cpu", weights_only=True), strict=True)
    var.load_state_dict(torch.load(var_dir / f"var_d{depth}.pth", map_location="cpu", weights_only=True), strict=True)
    vae.eval(), var.eval()

    # Self-check: mode 0 is the VAR sampler, so it must give var_d2's top-k/top-p tokens (batch 2, cfg 1.5).
    ref = torch.load(var_dir / "ar_topk900_topp096.pt", weights_only=True)
    _, basic_var, mfi = modules
    basic_var.MODE = mfi.MODE = 0
    with record_tokens(var) as seen, torch.inference_mode():
        var.autoregressive_infer_cfg(B=2, label_B=ref["label_B"], g_seed=int(ref["g_seed"]), cfg=float(ref["cfg"]),
                                     **ref["kwargs"])
    mode0_ok = all(torch.equal(a, b) for a, b in zip(seen, ref["idx_Bl_per_scale"]))

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save([m.clone() for m in masks], args.out / "masks.pt")
    rerun = {}
    for name, mode in RUNS.items():
        run = sample(var, mode, modules)
        again = sample(var, mode, modules)
        rerun[name] = all(torch.equal(a, b) for a, b in zip(run["idx_Bl_per_scale"], again["idx_Bl_per_scale"]))
        plain = sample(var, 0, modules)
        run["tokens_differing_from_mode0_per_scale"] = [
            int((a != b).sum()) for a, b in zip(run["idx_Bl_per_scale"], plain["idx_Bl_per_scale"])]
        torch.save(run, args.out / f"{name}.pt")
    meta = {
        "litevar": {"code_repo": "github.com/EkaterinaXie/LiteVAR",
                    "code_commit": "176ee6a (git mirror HEAD 'Add non-ignored files')",
                    "entry_point": "VAR.autoregressive_infer_cfg with --mode 1 / 2 (models/mask_for_inference.py)",
                    "window": WINDOW, "width_rule": "w = max(1, round(window * n_k)); mask |i*n_k/n_q - j| < w",
                    "masked_key_scales": {str(k): list(v) for k, v in MASKED.items()},
                    "widths_in_mask_order": widths,
                    "masks_file": "masks.pt",
                    "masks_format": "list of 30 bool (n_q, n_k) in the official order k; the official code got "
                                    "mask_list[k][block][head] = masks[k].float().unsqueeze(0), every block and head"},
        "runs": {name: {"file": f"{name}.pt", "mode": mode, "share_cfg": mode == 2} for name, mode in RUNS.items()},
        "var": {"file": "../var_d2/var_d2.pth", "depth": depth, "num_heads": heads,
                "sha256": sha256(var_dir / f"var_d{depth}.pth")},
        "vae": {"file": "../var_d2/vae.pth", "ch": var_meta["vae_ch"], "sha256": sha256(var_dir / "vae.pth")},
        "patch_nums": list(PN), "batch": len(LABELS), "label_B": LABELS, "g_seed": G_SEED, **SAMPLING,
        "torch": torch.__version__, "device": "cpu", "precision": "fp32 (no autocast), TF32 off, 2 threads",
        "patches": ["sys.argv = --model_depth 16 --mode 2 during import (module-level argparse)",
                    "stand-in modules models.caogao, models.dididi (absent from the repository)",
                    "torch.load of /mnt/public mask files returns None during import; mask_list filled here",
                    "MODE globals of models.basic_var and models.mask_for_inference set per run"],
        "self_check_mode0_equals_var_d2_ar_topk900_topp096": mode0_ok,
        "rerun_same_tokens": rerun, "total_seconds": round(time.time() - t0, 1),
        "files": sorted(p.name for p in args.out.iterdir() if p.suffix == ".pt"),
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: meta[k] for k in ("self_check_mode0_equals_var_d2_ar_topk900_topp096", "rerun_same_tokens",
                                           "total_seconds")}))
    for name in RUNS:
        print(name, torch.load(args.out / f"{name}.pt", weights_only=True)["tokens_differing_from_mode0_per_scale"])


if __name__ == "__main__":
    main()
