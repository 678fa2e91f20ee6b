"""Kernels against their pure-torch references (docs/STYLE.md §7) over the real VAR/HMAR scale schedule.

Triton runs in interpreter mode on the CPU, in fp32 and fp16 (the interpreter's bf16 is broken). TRITON_INTERPRET
must be set before triton is imported, and this pytest process may already hold a compiled-mode triton, so the
kernels run in one subprocess that saves inputs, outputs and info dicts; the comparisons happen here.
bf16 runs only on a GPU (`-m gpu`).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from varbench.kernels import (
    block_causal_ranges,
    block_sparse_attention,
    block_sparse_attention_ref,
    compact_kv_,
    compact_kv_ref_,
    expected_tiles_visited,
    markov_ranges,
    tiles_total,
)
from varbench.kernels.block_sparse_attn import triton_usable

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR/HMAR 256px schedule: 1 to 256 tokens per scale, L = 680
L = 680
BOUNDS = [0, 1, 5, 14, 30, 55, 91, 155, 255, 424, 680]
RANGES = {"markov": markov_ranges, "block_causal": block_causal_ranges}
ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Runs in a fresh interpreter with TRITON_INTERPRET=1. Every case is seeded, so the parent can recompute references.
_SCRIPT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
import torch.nn.functional as F
from varbench.kernels import block_causal_ranges, block_sparse_attention, compact_kv_, markov_ranges

PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
out = {"attn": [], "compact": []}

def attn_case(name, q, k, v, s, e, scale, **kw):
    o, info = block_sparse_attention(q, k, v, s, e, scale, impl="triton", **kw)
    out["attn"].append(dict(name=name, q=q, k=k, v=v, s=s, e=e, scale=scale, out=o, info=info, kw=kw))

g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16):
    for pattern, ranges in (("markov", markov_ranges), ("block_causal", block_causal_ranges)):
        s, e = ranges(PN)
        # VAR/HMAR attention: L2-normalised q, k and a learned per-head scale (sharp softmax).
        q, k, v = (torch.randn(1, 2, 680, 32, generator=g) for _ in range(3))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn_case(f"{pattern}/{dtype}", q.to(dtype), k.to(dtype), v.to(dtype), s, e, torch.tensor([4.0, 9.0]))
# Default scale, tiles that straddle several scales, D = 16, int64 ranges.
s, e = markov_ranges(PN)
q, k, v = (torch.randn(1, 2, 680, 16, generator=g) for _ in range(3))
attn_case("markov/blocks32x16", q, k, v, s.long(), e.long(), None, block_m=32, block_n=16)
# General ranges: gaps between rows, empty and out-of-range ranges, Lk != Lq, strided k/v, D = 40.
s = torch.randint(-5, 120, (100,), generator=g)
e = s + torch.randint(-3, 40, (100,), generator=g)
q = torch.randn(2, 3, 100, 40, generator=g)
k, v = (torch.randn(2, 130, 3, 40, generator=g).transpose(1, 2) for _ in range(2))
attn_case("general", q, k, v, s, e, 0.7, block_m=16, block_n=16)

def compact_case(name, cache, keep, layer):
    before = cache.clone()
    info = compact_kv_(cache[layer, 0], cache[layer, 1], keep, impl="triton")
    out["compact"].append(dict(name=name, before=before, after=cache, keep=keep, layer=layer, info=info))

B, H, C, D = 2, 2, 100, 80  # D = 80: two D-chunks per (b, h), the second one partial
for dtype in (torch.float32, torch.float16):
    for n_keep in (0, 1, 33, 64, 99, 100):
        cache = torch.randn(3, 2, B, H, C, D, generator=g).to(dtype)  # (layers, k|v, B, H, C, D)
        keep = torch.stack([torch.randperm(C, generator=g)[:n_keep].sort().values for _ in range(B * H)])
        compact_case(f"random/{n_keep}/{dtype}", cache, keep.view(B, H, n_keep), layer=1)
# Rows read and written inside one j-block (keep[1] = 2 is overwritten by j = 2) and across blocks.
cache = torch.randn(2, 2, 1, 1, C, D, generator=g)
keep = torch.cat([torch.tensor([0]), torch.arange(2, 40), torch.arange(41, 99, 2)]).view(1, 1, -1)
compact_case("overlap", cache, keep, layer=0)
torch.save(out, sys.argv[1])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs every Triton case once in an interpreter-mode subprocess; returns what it saved."""
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("kernels") / "interpreted.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(path, weights_only=False)


def _case(cases: list[dict], name: str) -> dict:
    (found,) = [c for c in cases if c["name"] == name]
    return found


# ---------------------------------------------------------------- ranges and the closed-form tile count


def test_ranges_follow_the_scale_schedule():
    ms, me = markov_ranges(PATCH_NUMS)
    cs, ce = block_causal_ranges(PATCH_NUMS)
    assert ms.shape == me.shape == cs.shape == ce.shape == (L,) and ms.dtype == torch.int32
    for si, (b, e) in enumerate(zip(BOUNDS[:-1], BOUNDS[1:])):
        assert e - b == PATCH_NUMS[si] ** 2
        assert set(ms[b:e].tolist()) == {b} and set(me[b:e].tolist()) == {e}
        assert set(cs[b:e].tolist()) == {0} and set(ce[b:e].tolist()) == {e}


def test_expected_tiles_visited_by_hand():
    # 64x64 tiles, Markov: the query tile rows [64t, 64t+64) meet scales whose union is [lo, hi); it visits key
    # tiles lo//64 .. ceil(hi/64)-1. Tiles 0..10 give 2, 3, 3, 5, 4, 4, 8, 5, 5, 5, 5 (tile 3 holds row 255, the
    # first of scale 8 = [255, 424), and tile 6 straddles scales 8 and 9).
    s, e = markov_ranges(PATCH_NUMS)
    assert expected_tiles_visited(s, e, 64, 64) == 49
    # Block-causal: tile t visits ceil(max_end / 64) key tiles: 2, 3, 4, 7, 7, 7 and then 11 five times.
    s, e = block_causal_ranges(PATCH_NUMS)
    assert expected_tiles_visited(s, e, 64, 64) == 85
    assert tiles_total(L, L, 64, 64) == 121
    # Single-token tiles (1x1) visit exactly the allowed (query, key) pairs: sum of squares vs triangular sums.
    assert expected_tiles_visited(*markov_ranges(PATCH_NUMS), 1, 1) == sum(pn**4 for pn in PATCH_NUMS)
    assert expected_tiles_visited(*block_causal_ranges(PATCH_NUMS), 1, 1) == sum(
        (e - b) * e for b, e in zip(BOUNDS[:-1], BOUNDS[1:]))
    # Empty and out-of-range rows: [5, 3) sees nothing; [-4, 2) and [30, 99) clip to [0, 2) and [30, 32) in Lk = 32.
    assert expected_tiles_visited([5, -4, 30], [3, 2, 99], 16, 16, num_keys=32) == 2


# ---------------------------------------------------------------- the reference, against independent formulations


@pytest.mark.parametrize("pattern", RANGES)
def test_reference_matches_masked_sdpa(pattern: str):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, L, 16, generator=g) for _ in range(3))
    s, e = RANGES[pattern](PATCH_NUMS)
    j = torch.arange(L)
    mask = (j[None] >= s[:, None]) & (j[None] < e[:, None])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(block_sparse_attention_ref(q, k, v, s, e, 0.3), want)


def test_markov_reference_is_attention_within_each_scale():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    scale = torch.tensor([2.0, 5.0])
    out = block_sparse_attention_ref(q, k, v, *markov_ranges(PATCH_NUMS), scale)
    for b, e in zip(BOUNDS[:-1], BOUNDS[1:]):
        p = torch.softmax(q[:, :, b:e] @ k[:, :, b:e].transpose(-1, -2) * scale.view(1, 2, 1, 1), dim=-1)
        torch.testing.assert_close(out[:, :, b:e], p @ v[:, :, b:e])
    assert torch.equal(out[:, :, 0], v[:, :, 0])  # the SOS token sees only itself


def test_reference_gives_zeros_to_queries_without_keys():
    q, k, v = torch.ones(1, 1, 2, 16), torch.ones(1, 1, 3, 16), torch.full((1, 1, 3, 16), 2.0)
    out = block_sparse_attention_ref(q, k, v, torch.tensor([1, 2]), torch.tensor([3, 2]))
    assert torch.equal(out[0, 0, 0], torch.full((16,), 2.0)) and torch.equal(out[0, 0, 1], torch.zeros(16))


def test_compact_reference_on_a_hand_case():
    k = torch.arange(6.0).view(1, 1, 6, 1).repeat(1, 2, 1, 2)  # (1, 2, 6, 2): row c holds c
    v = -k
    keep = torch.tensor([[[1, 3, 4], [0, 1, 5]]])
    assert compact_kv_ref_(k, v, keep) == {"impl": "ref", "n_keep": 3}
    assert k[0, 0, :, 0].tolist() == [1, 3, 4, 3, 4, 5] and k[0, 1, :, 0].tolist() == [0, 1, 5, 3, 4, 5]
    assert torch.equal(v, -k)


@pytest.mark.parametrize("keep", [[[[2, 1]]], [[[0, 6]]], [[[-1, 2]]]])
def test_compact_rejects_unsorted_or_out_of_range_keep(keep: list):
    with pytest.raises(ValueError):
        compact_kv_(torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4), torch.tensor(keep), impl="ref")


def test_dispatch_on_cpu():
    q = torch.randn(1, 2, L, 16)
    out, info = block_sparse_attention(q, q, q, *markov_ranges(PATCH_NUMS), impl="auto")
    assert info["impl"] == "ref" and out.shape == q.shape
    assert compact_kv_(q.clone(), q.clone(), torch.zeros(1, 2, 0, dtype=torch.long))["impl"] == "ref"
    with pytest.raises(ValueError, match="impl must be one of"):
        block_sparse_attention(q, q, q, *markov_ranges(PATCH_NUMS), impl="cuda")
    if triton_usable(torch.device("cpu"))[0]:
        pytest.skip("this process runs Triton interpreted, so impl='triton' is allowed on the CPU")
    with pytest.raises(RuntimeError, match="impl='triton' is unavailable"):
        block_sparse_attention(q, q, q, *markov_ranges(PATCH_NUMS), impl="triton")


# ---------------------------------------------------------------- Triton (interpreter) against the reference


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.float16"])
@pytest.mark.parametrize("pattern", RANGES)
def test_triton_attention_matches_reference(interpreted: dict, pattern: str, dtype: str):
    c = _case(interpreted["attn"], f"{pattern}/{dtype}")
    want = block_sparse_attention_ref(c["q"], c["k"], c["v"], c["s"], c["e"], c["scale"])
    assert c["out"].dtype == c["q"].dtype and c["info"]["impl"] == "triton"
    tol = 1e-5 if c["q"].dtype == torch.float32 else 2e-3
    torch.testing.assert_close(c["out"], want, atol=tol, rtol=tol)
    # Tiles: per head as in the closed form, and summed over B·H = 2 heads; Markov skips most of them.
    per_head = {"markov": 49, "block_causal": 85}[pattern]
    assert c["info"]["tiles_visited_per_head"] == per_head == expected_tiles_visited(c["s"], c["e"], 64, 64)
    assert c["info"]["tiles_visited"] == 2 * per_head and c["info"]["tiles_total"] == 2 * 121


def test_triton_attention_with_small_tiles_and_default_scale(interpreted: dict):
    c = _case(interpreted["attn"], "markov/blocks32x16")
    want = block_sparse_attention_ref(c["q"], c["k"], c["v"], c["s"], c["e"])
    torch.testing.assert_close(c["out"], want, atol=1e-5, rtol=1e-5)
    info = c["info"]
    assert (info["block_m"], info["block_n"]) == (32, 16)
    assert info["tiles_visited_per_head"] == expected_tiles_visited(c["s"], c["e"], 32, 16)
    assert info["tiles_visited_per_head"] < info["tiles_total_per_head"] == math.ceil(L / 32) * math.ceil(L / 16)


def test_triton_attention_on_general_ranges(interpreted: dict):
    c = _case(interpreted["attn"], "general")
    want = block_sparse_attention_ref(c["q"], c["k"], c["v"], c["s"], c["e"], c["scale"])
    torch.testing.assert_close(c["out"], want, atol=1e-5, rtol=1e-5)
    empty = c["e"].clamp(max=130) <= c["s"].clamp(min=0)
    assert empty.any() and torch.equal(c["out"][:, :, empty], torch.zeros_like(c["out"][:, :, empty]))
    per_head = expected_tiles_visited(c["s"], c["e"], 16, 16, num_keys=130)
    assert c["info"]["tiles_visited"] == 6 * per_head and per_head < c["info"]["tiles_total_per_head"]


def test_triton_compaction_matches_reference(interpreted: dict):
    cases = interpreted["compact"]
    assert {c["keep"].shape[-1] for c in cases} >= {0, 100}  # n_keep = 0 and n_keep = C (identity) included
    for c in cases:
        want = c["before"].clone()
        info = compact_kv_ref_(want[c["layer"], 0], want[c["layer"], 1], c["keep"])
        assert torch.equal(c["after"], want), c["name"]  # a pure move: bit-exact, other layers untouched
        assert c["info"] == {**info, "impl": "triton"}
        n = c["keep"].shape[-1]
        if n == c["before"].shape[-2]:
            assert torch.equal(c["after"], c["before"])


# ---------------------------------------------------------------- GPU only: bf16 and the compiled kernels


@pytest.mark.gpu
@ON_GPU
@pytest.mark.parametrize("pattern", RANGES)
def test_gpu_bf16_attention(pattern: str):
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(4, 16, L, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    s, e = (t.cuda() for t in RANGES[pattern](PATCH_NUMS))
    scale = torch.linspace(2.0, 10.0, 16, device="cuda")
    out, info = block_sparse_attention(q, k, v, s, e, scale, impl="auto")
    assert info["impl"] == "triton" and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, block_sparse_attention_ref(q, k, v, s, e, scale), atol=2e-2, rtol=2e-2)
    assert info["tiles_visited"] == 4 * 16 * expected_tiles_visited(s, e, info["block_m"], info["block_n"])


@pytest.mark.gpu
@ON_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_compaction(dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(4)
    cache = torch.randn(4, 2, 8, 16, L, 64, generator=g, device="cuda").to(dtype)  # (layers, k|v, B, H, C, D)
    n_keep = 300
    keep = torch.rand(8, 16, L, generator=g, device="cuda").argsort(-1)[..., :n_keep].sort(-1).values
    want = cache.clone()
    compact_kv_ref_(want[2, 0], want[2, 1], keep)
    assert compact_kv_(cache[2, 0], cache[2, 1], keep, impl="auto")["impl"] == "triton"
    assert torch.equal(cache, want)


# ---------------------------------------------------------------- slow: a sweep over tile sizes, interpreted


@pytest.mark.slow
def test_triton_tile_size_sweep(tmp_path: Path):
    pytest.importorskip("triton")
    script = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from varbench.kernels import block_causal_ranges, block_sparse_attention, markov_ranges
g = torch.Generator().manual_seed(5)
q, k, v = (torch.randn(1, 1, 680, 16, generator=g) for _ in range(3))
res = []
for ranges in (markov_ranges, block_causal_ranges):
    s, e = ranges((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    for bm, bn in ((16, 16), (16, 128), (128, 32)):
        res.append((s, e, bm, bn, *block_sparse_attention(q, k, v, s, e, impl="triton", block_m=bm, block_n=bn)))
torch.save({"qkv": (q, k, v), "res": res}, sys.argv[1])
"""
    path = tmp_path / "sweep.pt"
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    saved = torch.load(path, weights_only=False)
    q, k, v = saved["qkv"]
    for s, e, bm, bn, out, info in saved["res"]:
        torch.testing.assert_close(out, block_sparse_attention_ref(q, k, v, s, e), atol=1e-5, rtol=1e-5)
        assert info["tiles_visited"] == expected_tiles_visited(s, e, bm, bn)
