"""Pure-torch references for the kernels of varbench.kernels: the executable spec each kernel is tested against.

- `block_sparse_attention_ref`: attention where query i may see only keys j with kv_start[i] <= j < kv_end[i]
  (HMAR's block-diagonal "Markov" mask, docs/HMAR_SPEC.md §4, or VAR's block-causal mask, docs/VAR_SPEC.md).
- `compact_kv_ref_`: the in-place gather a KV-cache compression policy applies to a static cache buffer.

These favour clarity over speed; they run on any device and dtype that torch supports.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "allowed_mask",
    "block_causal_ranges",
    "block_sparse_attention_ref",
    "compact_kv_ref_",
    "head_scales",
    "markov_ranges",
    "scale_bounds",
]


def scale_bounds(patch_nums: tuple[int, ...] | list[int]) -> list[int]:
    """Token offsets of each scale's first token, plus the total: [0, pn0², pn0² + pn1², ..., L]."""
    if not patch_nums or any(int(pn) < 1 for pn in patch_nums):
        raise ValueError(f"patch_nums must be a non-empty sequence of positive ints, got {patch_nums!r}")
    bounds = [0]
    for pn in patch_nums:
        bounds.append(bounds[-1] + int(pn) ** 2)
    return bounds


def _per_token(patch_nums: tuple[int, ...] | list[int]) -> tuple[Tensor, Tensor]:
    """(begin, end) of the scale each token belongs to, as int32 (L,) tensors."""
    bounds = scale_bounds(patch_nums)
    sizes = torch.tensor([e - b for b, e in zip(bounds[:-1], bounds[1:])])
    begin = torch.repeat_interleave(torch.tensor(bounds[:-1]), sizes)  # (L,)
    end = torch.repeat_interleave(torch.tensor(bounds[1:]), sizes)  # (L,)
    return begin.to(torch.int32), end.to(torch.int32)


def markov_ranges(patch_nums: tuple[int, ...] | list[int]) -> tuple[Tensor, Tensor]:
    """HMAR's Markov attention: every token sees exactly the tokens of its own scale (block-diagonal).

    Returns:
        (kv_start, kv_end), int32 tensors of shape (L,) on the CPU; move them to the device once.
    """
    return _per_token(patch_nums)


def block_causal_ranges(patch_nums: tuple[int, ...] | list[int]) -> tuple[Tensor, Tensor]:
    """VAR's block-causal attention: tokens of scale s see every token of scales 0..s.

    Returns:
        (kv_start, kv_end), int32 tensors of shape (L,) on the CPU; kv_start is all zeros.
    """
    _, end = _per_token(patch_nums)
    return torch.zeros_like(end), end


def allowed_mask(kv_start: Tensor, kv_end: Tensor, num_keys: int) -> Tensor:
    """Boolean (Lq, Lk) mask: True where key j is in [kv_start[i], kv_end[i]).

    Ranges outside [0, num_keys) are clipped by this definition, which is also what the kernel does.
    """
    j = torch.arange(num_keys, device=kv_start.device)
    return (j[None, :] >= kv_start[:, None].long()) & (j[None, :] < kv_end[:, None].long())


def head_scales(scale: float | Tensor | None, num_heads: int, head_dim: int, device: torch.device) -> Tensor:
    """Softmax scale as an fp32 (H,) tensor: 1/sqrt(D) by default, a float for all heads, or one per head.

    VAR and HMAR L2-normalise q and k and learn a per-head scale, so callers pass their own.
    """
    if scale is None:
        return torch.full((num_heads,), 1.0 / math.sqrt(head_dim), device=device, dtype=torch.float32)
    if isinstance(scale, Tensor):
        if scale.numel() == 1:
            return scale.reshape(1).to(device=device, dtype=torch.float32).expand(num_heads).contiguous()
        if scale.numel() != num_heads:
            raise ValueError(f"scale must be a float or a tensor with 1 or H={num_heads} entries, "
                             f"got shape {tuple(scale.shape)}")
        return scale.reshape(num_heads).to(device=device, dtype=torch.float32).contiguous()
    return torch.full((num_heads,), float(scale), device=device, dtype=torch.float32)


def check_attention_args(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor) -> None:
    """Raises ValueError on shapes or dtypes that neither the kernel nor the reference accepts."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on B, H or D")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t.shape != (q.shape[2],) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int32/int64 tensor of shape (L,) = ({q.shape[2]},); "
                             f"got {t.dtype} {tuple(t.shape)}")


def block_sparse_attention_ref(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor,
                               scale: float | Tensor | None = None) -> Tensor:
    """Explicit masked softmax attention in fp32 (the spec of `block_sparse_attention`).

    Args:
        q: (B, H, Lq, D) queries.
        k, v: (B, H, Lk, D) keys and values.
        kv_start, kv_end: (Lq,) int tensors; query i attends to keys [kv_start[i], kv_end[i]).
        scale: softmax scale, a float or an (H,) tensor; default 1/sqrt(D).

    Returns:
        (B, H, Lq, D) in q's dtype. A query with no allowed key gets zeros (SDPA would give NaN).
    """
    check_attention_args(q, k, v, kv_start, kv_end)
    H, D, Lk = q.shape[1], q.shape[3], k.shape[2]
    s = head_scales(scale, H, D, q.device).view(1, H, 1, 1)
    mask = allowed_mask(kv_start.to(q.device), kv_end.to(q.device), Lk)  # (Lq, Lk)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * s  # (B, H, Lq, Lk)
    scores = scores.masked_fill(~mask, float("-inf"))
    # Rows with no allowed key would be all -inf: subtract 0 instead of -inf so they stay finite, then zero them.
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    p = torch.exp(scores - row_max)  # masked entries are exp(-inf) = 0
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v.float()) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(q.dtype)


def check_compact_args(k: Tensor, v: Tensor, keep: Tensor, *, check_values: bool) -> None:
    """Raises ValueError unless keep is (B, H, n_keep), in range, strictly ascending, with keep[..., j] >= j."""
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must be (B, H, C, D) of one shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if keep.dim() != 3 or keep.shape[:2] != k.shape[:2] or keep.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"keep must be an int (B, H, n_keep) tensor with B, H = {tuple(k.shape[:2])}; "
                         f"got {keep.dtype} {tuple(keep.shape)}")
    C, n_keep = k.shape[2], keep.shape[2]
    if n_keep > C:
        raise ValueError(f"n_keep = {n_keep} exceeds the buffer's capacity C = {C}")
    if not check_values or n_keep == 0:
        return
    if bool((keep[..., -1] >= C).any()) or bool((keep < 0).any()):
        raise ValueError(f"keep indices must lie in [0, {C})")
    if n_keep > 1 and not bool((keep[..., 1:] > keep[..., :-1]).all()):
        raise ValueError("keep must be strictly ascending along its last dimension")
    # Integers that are >= 0 and strictly ascending satisfy keep[..., j] >= j, which the in-place move relies on.


def compact_kv_ref_(k: Tensor, v: Tensor, keep: Tensor) -> dict:
    """In place: k[b, h, j] = old k[b, h, keep[b, h, j]] for j < n_keep, and the same for v.

    Entries j >= n_keep are left as they were. Uses a gathered temporary (the kernel does not).

    Args:
        k, v: (B, H, C, D) buffers; views of a larger static cache are fine.
        keep: (B, H, n_keep) int indices, strictly ascending per (b, h).

    Returns:
        {"impl": "ref", "n_keep": n_keep}
    """
    check_compact_args(k, v, keep, check_values=True)
    n_keep = keep.shape[2]
    if n_keep > 0:
        idx = keep.long().unsqueeze(-1).expand(-1, -1, -1, k.shape[3])  # (B, H, n_keep, D)
        for buf in (k, v):
            buf[:, :, :n_keep].copy_(torch.gather(buf, 2, idx))
    return {"impl": "ref", "n_keep": n_keep}
