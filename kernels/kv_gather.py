"""In-place KV-cache compaction (Triton + reference) for KV compression policies over a static cache buffer.

A policy (H2O, SnapKV, ScaleKV, ...) picks, per (batch, head), the cached entries to keep; `compact_kv_` moves them
to the front of the same buffer, k[b, h, j] = old k[b, h, keep[b, h, j]] for j < n_keep, so that the cache stays a
static allocation (no torch.cat, no new buffer: docs/PERF_NOTES.md). Entries j >= n_keep keep stale values; the
caller tracks the new length. Written from that rule; no kernel code was copied.
"""

from __future__ import annotations

from torch import Tensor

from .block_sparse_attn import resolve_impl
from .reference import check_compact_args, compact_kv_ref_

try:  # Triton is optional: without it only impl="ref" works.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = ["compact_kv_"]

BLOCK_J = 32  # kept rows moved per step
MAX_BLOCK_D = 64  # channels per program; larger D is split over programs along the grid's second axis


if triton is not None:

    @triton.jit
    def _compact_kv_kernel(
        k_ptr, v_ptr, keep_ptr,
        skb, skh, skc, skd, svb, svh, svc, svd, spb, sph, spj,
        H, N_KEEP, D,
        BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program = one (b, h) and one chunk of D channels; grid = (B * H, cdiv(D, BLOCK_D)).
        #
        # Why the in-place move is race-free. Programs touch disjoint (b, h, channel) sets, so only the j-blocks
        # of one program can interact, and the program walks them in increasing order. Block [j0, j0 + BLOCK_J)
        # writes rows j0 .. j0 + BLOCK_J - 1 and reads rows keep[j] >= j >= j0. (1) Earlier blocks wrote only rows
        # < j0, which this block never reads, so its reads see original values. (2) Its own writes land on rows
        # that later blocks never read (they read rows >= their first j > these rows). (3) Inside the block a
        # written row may also be a row the block reads (keep[j'] = j for some j' < j); the barrier between the
        # loads and the stores makes every thread finish reading before any thread writes. The barrier of the
        # next block also orders this block's loads before the next block's stores, which may hit rows this block
        # read (keep[j] can reach past j0 + BLOCK_J).
        pid_bh = tl.program_id(0)
        pid_d = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # int64 offsets: a large static cache can pass 2**31 elements
        h = pid_bh % H
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        keep_base = keep_ptr + b * spb + h * sph
        for j0 in range(0, N_KEEP, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            src = tl.load(keep_base + offs_j * spj, mask=offs_j < N_KEEP, other=0)
            # Rows already in place (keep[j] == j, e.g. attention sinks at the front) need no traffic.
            move = (offs_j < N_KEEP) & (src != offs_j)
            m2 = move[:, None] & d_ok[None, :]
            kr = tl.load(k_base + src[:, None] * skc + offs_d[None, :] * skd, mask=m2)
            vr = tl.load(v_base + src[:, None] * svc + offs_d[None, :] * svd, mask=m2)
            tl.debug_barrier()
            tl.store(k_base + offs_j[:, None] * skc + offs_d[None, :] * skd, kr, mask=m2)
            tl.store(v_base + offs_j[:, None] * svc + offs_d[None, :] * svd, vr, mask=m2)


def compact_kv_(k: Tensor, v: Tensor, keep: Tensor, impl: str = "auto", *, check: bool = True) -> dict:
    """In place: k[b, h, j] = old k[b, h, keep[b, h, j]] for j < n_keep, and the same for v.

    Args:
        k, v: (B, H, C, D) cache buffers of one shape and dtype, on one device. Views of a larger static cache (e.g.
            one layer of a (layers, B, H, C, D) buffer) are fine: any strides, nothing is copied.
        keep: (B, H, n_keep) int32/int64 indices into C, strictly ascending per (b, h) (hence keep[..., j] >= j).
        impl: "triton" (raises if it cannot run here), "ref" (torch.gather into a temporary), "auto" (triton on
            CUDA, ref otherwise).
        check: validate keep's values first (range, strict order). It syncs with the device, so a hot loop whose
            policy guarantees sorted indices passes False; an unsorted keep then gives undefined contents.

    Returns:
        {"impl": what ran, "n_keep": n_keep}
    """
    check_compact_args(k, v, keep, check_values=check)
    if k.dtype != v.dtype or k.device != v.device or keep.device != k.device:
        raise ValueError(f"k, v and keep must share a device and k, v a dtype; got k {k.dtype}@{k.device}, "
                         f"v {v.dtype}@{v.device}, keep@{keep.device}")
    chosen = resolve_impl(impl, k.device)
    if chosen == "ref":
        return compact_kv_ref_(k, v, keep)
    B, H, _, D = k.shape
    n_keep = keep.shape[2]
    if n_keep > 0 and B * H > 0 and D > 0:
        block_d = min(MAX_BLOCK_D, triton.next_power_of_2(D))
        _compact_kv_kernel[(B * H, triton.cdiv(D, block_d))](
            k, v, keep, *k.stride(), *v.stride(), *keep.stride(), H, n_keep, D,
            BLOCK_J=BLOCK_J, BLOCK_D=block_d,
        )
    return {"impl": "triton", "n_keep": n_keep}
