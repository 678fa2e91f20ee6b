"""Block-sparse attention (Triton, IO-aware) for HMAR's Markov attention and VAR's block-causal attention.

Query i may attend only to keys j with kv_start[i] <= j < kv_end[i] (Markov: its own scale, docs/HMAR_SPEC.md §4;
block-causal: scales 0..s, docs/VAR_SPEC.md). The kernel tiles queries (BLOCK_M) and keys (BLOCK_N); each query
tile walks the key tiles between the lowest start and the highest end of its rows, computes a key tile only if some
row's range intersects it, masks partially covered tiles element by element, and keeps an online softmax in fp32,
so that the scores never go to memory and key tiles nobody may see are never loaded. Forward only (inference and
teacher-forced evaluation; no autograd). Written from the masking rule above and the online-softmax identity; no
kernel code was copied.

Tile accounting (`tiles_visited`, `tiles_total` in the info dict) is summed over all B·H heads; the per-head
numbers are `tiles_visited_per_head` and `tiles_total_per_head`, and `expected_tiles_visited` gives the per-head
count in closed form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import block_sparse_attention_ref, check_attention_args, head_scales

try:  # Triton is optional: without it only impl="ref" works.
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = ["BLOCK_M", "BLOCK_N", "block_sparse_attention", "expected_tiles_visited", "resolve_impl", "tiles_total",
           "triton_usable"]

BLOCK_M = 64
BLOCK_N = 64

IMPLS = ("auto", "triton", "ref")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tiles_total(num_queries: int, num_keys: int, block_m: int = BLOCK_M, block_n: int = BLOCK_N) -> int:
    """Number of (query-tile, key-tile) pairs of a dense pass over one head."""
    return _cdiv(num_queries, block_m) * _cdiv(num_keys, block_n)


def expected_tiles_visited(kv_start: Tensor | list[int], kv_end: Tensor | list[int], block_m: int = BLOCK_M,
                           block_n: int = BLOCK_N, num_keys: int | None = None) -> int:
    """Per-head count of (query-tile, key-tile) pairs the kernel computes, in closed form (pure Python).

    A pair is computed iff some query i of the tile has a non-empty clipped range [max(s_i, 0), min(e_i, Lk)) that
    intersects the key tile, i.e. the key tile index lies in [s_i // block_n, ceil(e_i / block_n)).

    Args:
        kv_start, kv_end: per-query ranges, (L,) tensors or lists.
        block_m, block_n: query and key tile sizes the kernel ran with.
        num_keys: Lk; defaults to L (self-attention).
    """
    starts = [int(x) for x in (kv_start.tolist() if isinstance(kv_start, Tensor) else kv_start)]
    ends = [int(x) for x in (kv_end.tolist() if isinstance(kv_end, Tensor) else kv_end)]
    lk = len(starts) if num_keys is None else num_keys
    visited = 0
    for m0 in range(0, len(starts), block_m):
        key_tiles: set[int] = set()
        for s, e in zip(starts[m0:m0 + block_m], ends[m0:m0 + block_m]):
            s, e = max(s, 0), min(e, lk)
            if s < e:
                key_tiles.update(range(s // block_n, _cdiv(e, block_n)))
        visited += len(key_tiles)
    return visited


if triton is not None:

    @triton.jit
    def _block_sparse_attn_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, start_ptr, end_ptr, scale_ptr, count_ptr,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        H, LQ, LK, D,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    ):
        # One program = one query tile of one (b, h); grid = (cdiv(Lq, BLOCK_M), B * H).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # int64 offsets: a large static cache can pass 2**31 elements
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < LQ
        d_ok = offs_d < D

        # Clip the ranges to [0, Lk): the mask semantics of the reference, and no load can leave the buffer.
        lo = tl.minimum(tl.maximum(tl.load(start_ptr + offs_m, mask=row_ok, other=0), 0), LK)
        hi = tl.minimum(tl.maximum(tl.load(end_ptr + offs_m, mask=row_ok, other=0), 0), LK)
        live = row_ok & (lo < hi)  # rows with at least one key; padding and empty rows must not widen the hull
        tile_lo = tl.min(tl.where(live, lo, LK), axis=0)
        tile_hi = tl.max(tl.where(live, hi, 0), axis=0)
        first = (tile_lo // BLOCK_N) * BLOCK_N  # key tiles before this one hold no allowed key for any row

        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # Fold log2(e) into the scale: exp(x) = exp2(x * log2 e), and exp2 is the cheaper instruction.
        qk_scale = tl.load(scale_ptr + h) * 1.4426950408889634

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        visited = 0
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        for n0 in range(first, tile_hi, BLOCK_N):
            # The hull [tile_lo, tile_hi) can have gaps for general ranges; skip key tiles no row may see.
            hit = live & (lo < n0 + BLOCK_N) & (hi > n0)
            if tl.max(hit.to(tl.int32), axis=0) > 0:
                visited += 1
                cols = n0 + offs_n
                col_ok = cols < LK
                kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                             mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
                if IEEE:
                    s = tl.dot(q, kt, input_precision="ieee")
                else:
                    s = tl.dot(q, kt)
                allowed = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
                s = tl.where(allowed, s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                # A row with nothing allowed so far has m_new = -inf; subtracting 0 keeps exp2 at 0, not NaN.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                vt = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                             mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
                if IEEE:
                    pv = tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(vt.dtype), vt)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
        # Rows that saw no key (l = 0) output zeros, as the reference does.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(count_ptr + pid_bh * tl.num_programs(0) + pid_m, visited)


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on tensors of `device`, and why not.

    On CPU they run only under Triton's interpreter, which is chosen when triton is imported (TRITON_INTERPRET=1).
    """
    if triton is None:
        return False, "triton is not installed"
    interpreted = isinstance(_block_sparse_attn_kernel, InterpretedFunction)
    if device.type == "cuda" and not interpreted:
        return True, ""
    if device.type == "cpu" and interpreted:
        return True, ""
    if device.type == "cpu":
        return False, "tensors are on the CPU and Triton's interpreter is off (set TRITON_INTERPRET=1 before " \
                      "importing triton)"
    return False, f"the Triton kernels here run on CUDA, or on the CPU when interpreted; got device {device}"


def resolve_impl(impl: str, device: torch.device) -> str:
    """Maps impl ("auto" | "triton" | "ref") to the implementation that will run, raising if it cannot."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "ref":
        return "ref"
    ok, why = triton_usable(device)
    if impl == "auto":
        return "triton" if ok and device.type == "cuda" else "ref"
    if not ok:
        raise RuntimeError(f"impl='triton' is unavailable: {why}")
    return "triton"


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor,
                           scale: float | Tensor | None = None, impl: str = "auto", *,
                           block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                           count_tiles: bool = True) -> tuple[Tensor, dict]:
    """Attention in which query i sees only keys [kv_start[i], kv_end[i]), skipping key tiles nobody may see.

    Args:
        q: (B, H, Lq, D) queries; any strides.
        k, v: (B, H, Lk, D) keys and values, same dtype as q.
        kv_start, kv_end: (Lq,) int32/int64 ranges (see `markov_ranges`, `block_causal_ranges`); on q's device for
            the kernel (they are moved if not). Ranges are clipped to [0, Lk); a query with no key gets zeros.
        scale: softmax scale, a float or an (H,) tensor (VAR/HMAR's learned per-head scale); default 1/sqrt(D).
        impl: "triton" (raises if it cannot run here), "ref" (pure torch), "auto" (triton on CUDA, ref otherwise).
        block_m, block_n: query and key tile sizes of the kernel (powers of two, >= 16).
        count_tiles: read the kernel's tile counter back to the host. That is a device sync, so a hot loop
            passes False and gets "tiles_visited" = None.

    Returns:
        (out, info): out is (B, H, Lq, D) in q's dtype; info has "impl" (what ran), and for the kernel
        "tiles_visited" / "tiles_total" summed over the B·H heads, their per-head values "tiles_visited_per_head"
        / "tiles_total_per_head" (equal across heads: the ranges are shared), "block_m" and "block_n". The "ref"
        path reports "tiles_visited" = "tiles_total" = None (it computes the dense score matrix).
    """
    check_attention_args(q, k, v, kv_start, kv_end)
    chosen = resolve_impl(impl, q.device)
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    if chosen == "ref":
        out = block_sparse_attention_ref(q, k, v, kv_start, kv_end, scale)
        return out, {"impl": "ref", "tiles_visited": None, "tiles_total": None}
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {blk}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton kernel takes fp32, fp16 or bf16; got {q.dtype}")
    scales = head_scales(scale, H, D, q.device)
    starts = kv_start.to(device=q.device, dtype=torch.int32)
    ends = kv_end.to(device=q.device, dtype=torch.int32)
    out = torch.empty((B, H, LQ, D), device=q.device, dtype=q.dtype)
    n_mtiles = _cdiv(LQ, block_m)
    if out.numel() == 0:  # an empty grid is not a launch Triton accepts
        return out, {"impl": "triton", "tiles_visited": 0, "tiles_total": 0, "tiles_visited_per_head": 0,
                     "tiles_total_per_head": tiles_total(LQ, LK, block_m, block_n), "block_m": block_m,
                     "block_n": block_n}
    counts = torch.zeros((B * H, n_mtiles), device=q.device, dtype=torch.int32)
    _block_sparse_attn_kernel[(n_mtiles, B * H)](
        q, k, v, out, starts, ends, scales, counts,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, LQ, LK, D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        IEEE=q.dtype == torch.float32,  # fp32 callers want fp32 products, not TF32's 10-bit mantissa
    )
    visited = int(counts.sum()) if count_tiles else None
    total_per_head = tiles_total(LQ, LK, block_m, block_n)
    return out, {
        "impl": "triton",
        "tiles_visited": visited,
        "tiles_total": total_per_head * B * H,
        "tiles_visited_per_head": visited // (B * H) if visited is not None and B * H else None,
        "tiles_total_per_head": total_per_head,
        "block_m": block_m,
        "block_n": block_n,
    }

