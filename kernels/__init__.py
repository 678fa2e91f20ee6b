"""varbench.kernels: custom kernels, each with a pure-torch reference beside it (kernels/reference.py).

- `block_sparse_attention(q, k, v, kv_start, kv_end, scale=None, impl="auto")`: attention where query i sees only
  keys [kv_start[i], kv_end[i]), skipping key tiles no query of a tile may see. `markov_ranges(patch_nums)` gives
  HMAR's block-diagonal pattern, `block_causal_ranges(patch_nums)` VAR's block-causal one, and
  `expected_tiles_visited` the kernel's per-head tile count in closed form.
- `compact_kv_(k, v, keep, impl="auto")`: in-place gather of the kept KV-cache entries to the front of a static
  buffer, for KV compression policies.

Dispatch is explicit: impl="triton" runs the Triton kernel or raises (no Triton, or CPU tensors without
TRITON_INTERPRET=1 set before triton was imported), impl="ref" runs the reference, and impl="auto" picks "triton"
for CUDA tensors when Triton is installed and "ref" otherwise. Each call returns an info dict whose "impl" is what
actually ran, for the record's `kernel_impl`.

Kernels depend on torch (and optionally Triton) only; they never import the harness or the variants.
"""

from .block_sparse_attn import block_sparse_attention, expected_tiles_visited, resolve_impl, tiles_total
from .kv_gather import compact_kv_
from .reference import block_causal_ranges, block_sparse_attention_ref, compact_kv_ref_, markov_ranges

__all__ = [
    "block_causal_ranges",
    "block_sparse_attention",
    "block_sparse_attention_ref",
    "compact_kv_",
    "compact_kv_ref_",
    "expected_tiles_visited",
    "markov_ranges",
    "resolve_impl",
    "tiles_total",
]
