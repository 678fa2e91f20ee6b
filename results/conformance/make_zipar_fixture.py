"""Makes the ZipAR conformance fixture (conformance/zipar_tiny/) by running the OFFICIAL ZipAR c2i sampler.

Usage: python results/conformance/make_zipar_fixture.py ZIPAR_SRC OUT_DIR [--llamagen-fixture DIR]

ZIPAR_SRC is a work tree of ThisisBillhe/ZipAR@2a5695ca (its LlamaGen-ZipAR/ folder is imported at run time; none
of its code is in this file). `git archive HEAD` fails on that mirror (missing blob assets/teaser.jpg), so the
tree was made with `git show HEAD:<path>` for every .py/.md/.txt/.sh file. The model is the tiny random LlamaGen
c2i GPT of conformance/llamagen_tiny/ (official layout, 2 layers, 2 heads, width 64, vocabulary 256, 16x16 grid),
built with ZipAR's own `Transformer(ModelArgs(...))` as the official `GPT_models` entries hard-code sizes.

The calls mirror autoregressive/sample/sample_c2i_ddp_zipar.py: `gpt_model.zipar_window_size = W`, then
`generate_zipar.generate(model, labels, 256, cfg_scale, cfg_interval, temperature, top_k, top_p,
sample_logits=True)` for W > 0 and the plain `generate.generate` for W = 0 (the script's switch-off), then
`gpt_model.reset_zipar()`. `torch.manual_seed(0)` precedes every call (the script seeds once per process; one
seed per run makes each run replayable alone). CPU, fp32, 2 threads, eval mode.

Patches needed on a CPU: none. `torch.backends.cuda.sdp_kernel` (used as a context manager in the decode loops)
still exists in torch 2.14 and is a no-op on the CPU; the official files are not edited. The only additions are
instrumentation with no numeric effect: the module-level `sample` of each generate module is wrapped to record
the (post-CFG) logits each call receives and the token it returns, and `model.forward` is wrapped to record the
sequence positions fed in each network call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch

LABELS = [207, 360]
G_SEED = 0
WINDOWS = (8, 4)  # 8: the official --zipar-window-size default; 4: a second window
# name -> generate kwargs; default_cfg2 is the official script's defaults (cfg 2, no top-k/top-p, temperature 1)
SETTINGS = {
    "greedy_nocfg": {"cfg_scale": 1.0, "cfg_interval": -1, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    "greedy_cfg2": {"cfg_scale": 2.0, "cfg_interval": -1, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    "default_cfg2": {"cfg_scale": 2.0, "cfg_interval": -1, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    # guidance stops past token 10 of the first row, and again past the parallel phase's 10th token
    "greedy_cfg4_interval10": {"cfg_scale": 4.0, "cfg_interval": 10, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
}
OFF_SETTINGS = ("greedy_nocfg", "default_cfg2")  # run at window 0 too (the official switch-off)


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def build_gpt(state_path: Path, gpt_cfg: dict):
    """ZipAR's Transformer at the llamagen_tiny size, with the fixture's weights."""
    from autoregressive.models.gpt import ModelArgs, Transformer

    keys = ("n_layer", "n_head", "dim", "vocab_size", "block_size", "num_classes", "cls_token_num", "model_type")
    model = Transformer(ModelArgs(**{k: gpt_cfg[k] for k in keys}))
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    return model.eval()


class Recorder:
    """Wraps a generate module's `sample` and the model's forward; records, never changes, what passes."""

    def __init__(self, model, modules):
        self.model, self.modules = model, modules
        self.orig_sample = {m: m.sample for m in modules}
        self.orig_forward = model.forward
        self.logits, self.tokens, self.positions = [], [], []

    def __enter__(self):
        for m in self.modules:
            m.sample = self._wrap_sample(self.orig_sample[m])
        self.model.forward = self._forward
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            m.sample = self.orig_sample[m]
        del self.model.forward  # back to the class method

    def _wrap_sample(self, fn):
        def wrapped(logits, **kw):
            self.logits.append(logits[:, -1, :].detach().clone())
            out = fn(logits, **kw)
            self.tokens.append(out[0].detach().clone().view(-1))
            return out
        return wrapped

    def _forward(self, idx, cond_idx, input_pos=None, **kw):
        self.positions.append([int(p) for p in input_pos.view(-1)])
        return self.orig_forward(idx, cond_idx, input_pos, **kw)


def replay_margin(logits: torch.Tensor, sampled: torch.Tensor, kwargs: dict) -> dict:
    """Replays the draws of an unfiltered run (top_k 0, top_p 1): on the CPU, multinomial(p, 1) is
    argmax(p / E) with E = exponential_(1) of p's shape from the global generator, one draw per sample() call.
    Returns whether that reproduces every token and the smallest log-ratio margin of the chosen token."""
    if kwargs["top_k"] != 0 or kwargs["top_p"] < 1.0:
        return {}
    gen = torch.Generator().manual_seed(G_SEED)
    same, margin = True, float("inf")
    for n in range(logits.shape[1]):
        probs = torch.softmax(logits[:, n] / max(kwargs["temperature"], 1e-5), dim=-1)  # (B, V)
        score = probs.log() - torch.empty_like(probs).exponential_(1, generator=gen).log()
        top2 = score.topk(2, dim=-1)
        same &= bool(torch.equal(top2.indices[:, 0], sampled[:, n]))
        margin = min(margin, float((top2.values[:, 0] - top2.values[:, 1]).min()))
    return {"multinomial_equals_exponential_argmax_replay": same, "min_sampling_logratio_margin": margin}


def run_one(model, gen_zipar, gen_plain, window: int, kwargs: dict) -> dict:
    """One official call; returns the tokens and the recorded calls."""
    model.reset_zipar()
    model.zipar_window_size = window
    labels = torch.tensor(LABELS)
    module = gen_zipar if window > 0 else gen_plain
    with Recorder(model, [module]) as rec:
        torch.manual_seed(G_SEED)
        tokens = module.generate(model, labels, model.block_size, sample_logits=True, **kwargs)
    n_calls = len(rec.positions)
    model.reset_zipar()
    logits = torch.stack(rec.logits, 1)  # (B, n_samples, V): post-CFG logits in the order sample() was called
    top2 = logits.topk(2, dim=-1).values
    return {"tokens": tokens.to(torch.int64), "labels": labels, "window": window, "kwargs": kwargs,
            "gen_seed": G_SEED, "sample_logits_in": logits, "sampled": torch.stack(rec.tokens, 1),
            "positions": rec.positions, "network_calls": n_calls,
            "min_top2_gap": float((top2[..., 0] - top2[..., 1]).min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="ZipAR work tree (holds LlamaGen-ZipAR/)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--llamagen-fixture", type=Path,
                    default=Path(__file__).resolve().parents[3] / "shared/conformance/llamagen_tiny")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=FutureWarning)  # sdp_kernel deprecation, once per call
    sys.path.insert(0, str(args.src / "LlamaGen-ZipAR"))
    from autoregressive.models import generate as gen_plain
    from autoregressive.models import generate_zipar as gen_zipar

    lg = args.llamagen_fixture
    lg_meta = json.loads((lg / "meta.json").read_text())
    model = build_gpt(lg / "gpt_state_dict.pt", lg_meta["gpt_cfg"])
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results, runs = {}, [(w, s) for w in WINDOWS for s in SETTINGS] + [(0, s) for s in OFF_SETTINGS]
    for window, setting in runs:
        name = f"w{window}_{setting}"
        rec = run_one(model, gen_zipar, gen_plain, window, SETTINGS[setting])
        again = run_one(model, gen_zipar, gen_plain, window, SETTINGS[setting])
        rec["setting"] = setting
        torch.save(rec, args.out / f"gen_{name}.pt")
        res = {"identical_two_runs": bool(torch.equal(rec["tokens"], again["tokens"])),
               "network_calls": rec["network_calls"], "min_top2_gap": rec["min_top2_gap"],
               "sha_tokens": sha(rec["tokens"]), "tokens_first16": rec["tokens"][:, :16].tolist(),
               **replay_margin(rec["sample_logits_in"], rec["sampled"], rec["kwargs"])}
        ref = lg / f"gen_{setting}.pt"
        if window == 0 and ref.is_file():  # the switch-off must be plain LlamaGen, token for token
            want = torch.load(ref, weights_only=True)["tokens"].long()
            res["equals_llamagen_tiny_tokens"] = bool(torch.equal(rec["tokens"], want))
        results[name] = res
    meta = {
        "zipar": {"repo": "https://github.com/ThisisBillhe/ZipAR", "commit": "2a5695ca2525872ac6ee38c9d62be38f0c9e985b",
                  "entry_point": "LlamaGen-ZipAR/autoregressive/models/generate_zipar.py generate (window > 0), "
                                 "generate.py generate (window 0), as sample_c2i_ddp_zipar.py selects",
                  "windows": list(WINDOWS) + [0]},
        "weights": "../llamagen_tiny/gpt_state_dict.pt (loaded with ZipAR's gpt.Transformer; no VQ: tokens only)",
        "gpt_cfg": lg_meta["gpt_cfg"], "labels": LABELS, "gen_seed": G_SEED, "settings": SETTINGS,
        "torch": torch.__version__, "threads": 2, "runtime_s": round(time.time() - t0, 1), "results": results,
        "notes": {
            "rng": "torch.manual_seed(gen_seed) right before each generate(); every sample() call draws "
                   "torch.multinomial(probs (B, V), 1) from the global CPU generator, one call per sampled "
                   "position (in the parallel phase: per row in progress, in the order the rows started)",
            "patches": "none to official code; instrumentation wraps sample() and model.forward (records only)",
            "file_keys": "setting, kwargs, window, labels, gen_seed, tokens (B, 256) int64 raster order (official "
                         "return), sampled (B, 256) tokens in sample() call order, sample_logits_in (B, 256, V) "
                         "the post-CFG logits each sample() call got, positions (list per network call after "
                         "the prefill too: input_pos fed), network_calls, min_top2_gap",
            "rerun": "OMP_NUM_THREADS=2 python results/conformance/make_zipar_fixture.py /tmp/zipar_src "
                     "../shared/conformance/zipar_tiny",
        },
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
