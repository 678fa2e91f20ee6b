"""ScaleKV's released selection and budget files (`selection="official"`, `budgets=PATH` of variants/kv_scalekv.py).

Written from docs/INFINITY_SPEC.md §8 and a reading of StargazerX0/ScaleKV@eb0615a (scale_kv.py
`ScaleKVCluster.update_kv` / `_select_window_indices`, enable_scale_kv_2b.py `get_cache_sizes`,
budgets/2b_10%_budget.json); nothing copied. After a scale's attention, a layer whose cache holds more than
its capacity keeps, per batch row and head (so both CFG halves independently):
- the observation window: the centre token of each cell of a √w×√w grid over the current h×w map (cell
  side ⌊h/√w⌋, centre (side − 1)//2 inside it), or the last w keys when the map is not square or smaller
  than the grid;
- the top (capacity − w) other keys by the window's summed raw scores q_raw·kᵀ/√c (q_raw: the qkv projection of
  the attention input without bias, normalisation, learned scale or RoPE; k: the cached keys), window columns at
  −inf, max-pooled along keys (kernel 5, stride 1, padding 2), window positions excluded after pooling;
kept positions sorted. Nothing is compressed while the cache holds at most the gate (`max_capacity` 650 in the
released scripts) and no layer has compressed yet; from then on every scale compresses.

Budget file format (the released JSONs): {"Scale N": {"Block i": 0 | 1, ..., "High": count of 1s, "Max": int,
"Min": int, "Limit": int}}. After scale index si the capacity of block i is Max where its flag is 1, else Min, read
from entry N = si + 2; si = 12 (the last of the 1M schedule) reads entry 13, as the code does. "High" and "Limit"
are informational ("High" is checked against the flags when present).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .kv_base import grid_centres

__all__ = ["RELEASED_GATE", "official_window", "official_keep", "read_budgets", "budget_entry"]

RELEASED_GATE = 650  # `max_capacity` of the released infer/sample scripts (the class default 121 is unused)
_SCALE = re.compile(r"^Scale (\d+)$")
_BLOCK = re.compile(r"^Block (\d+)$")


def official_window(size: int, window: int, n_keys: int) -> list[int]:
    """Slots (of n_keys held, the current map's `size` keys last) of the observation window."""
    side, grid = math.isqrt(size), math.isqrt(window)
    if side * side != size or grid * grid != window or side < grid:
        return list(range(n_keys - min(window, n_keys), n_keys))  # the code's fallback: the most recent keys
    start = n_keys - size
    return [start + s for s in grid_centres(side, grid)]


def official_keep(raw_q: Tensor, keys: Tensor, window: Tensor, capacity: int, kernel: int = 5) -> Tensor:
    """(B, H, capacity) ascending kept slots.

    Args:
        raw_q: (B, H, w, c) raw queries of the window tokens.
        keys: (B, H, N, c) every key held (this scale's last).
        window: (w,) slots of the window tokens.
        capacity: slots kept, window included (at least w).
        kernel: max-pool kernel along keys.
    """
    n_keys, w = keys.shape[2], window.numel()
    logits = raw_q.float() @ keys.float().transpose(-1, -2) / math.sqrt(raw_q.shape[-1])  # (B, H, w, N)
    logits[..., window] = float("-inf")  # the window does not vote for itself
    pooled = F.max_pool1d(logits.sum(-2), kernel, stride=1, padding=kernel // 2)  # (B, H, N)
    pooled[..., window] = float("-inf")  # pooling spreads finite scores onto window slots: exclude them again
    rest = pooled.topk(min(capacity - w, n_keys - w), dim=-1).indices
    both = torch.cat((rest, window.expand(*rest.shape[:2], w)), dim=-1)
    return both.sort(dim=-1).values


def _fail(path: str | Path, where: str, why: str) -> ValueError:
    return ValueError(f"ScaleKV budgets file {path}: {where} {why} (the released format: {{\"Scale N\": "
                      f"{{\"Block i\": 0 or 1, ..., \"Max\": int, \"Min\": int}}}})")


def _int(value, path, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(path, where, f"must be a positive int, got {value!r}")
    return value


def _scale(entry, path, name: str, depth: int | None) -> tuple[int, ...]:
    """One "Scale N" entry to the capacity of each of `depth` blocks (None: as many as it lists)."""
    if not isinstance(entry, dict):
        raise _fail(path, repr(name), f"must be an object, got {type(entry).__name__}")
    for key in ("Max", "Min"):
        if key not in entry:
            raise _fail(path, repr(name), f"has no {key!r}")
    hi, lo = _int(entry["Max"], path, f"{name!r} -> 'Max'"), _int(entry["Min"], path, f"{name!r} -> 'Min'")
    flags: dict[int, int] = {}
    for key, value in entry.items():
        m = _BLOCK.match(key)
        if m:
            if depth is not None and int(m.group(1)) >= depth:
                raise _fail(path, f"{name!r} -> {key!r}", f"is beyond the model's {depth} blocks")
            if value not in (0, 1) or isinstance(value, bool):
                raise _fail(path, f"{name!r} -> {key!r}", f"must be 0 or 1, got {value!r}")
            flags[int(m.group(1))] = value
        elif key not in ("Max", "Min", "High", "Limit"):
            raise _fail(path, f"{name!r} -> {key!r}", "is not a known key (Block i, High, Max, Min, Limit)")
    depth = len(flags) if depth is None else depth
    missing = [i for i in range(depth) if i not in flags]
    if missing:
        raise _fail(path, repr(name), f"has no 'Block {missing[0]}' (the model has {depth} blocks)")
    if "High" in entry and entry["High"] != sum(flags.values()):
        raise _fail(path, f"{name!r} -> 'High'", f"is {entry['High']!r} but {sum(flags.values())} blocks are 1")
    return tuple(hi if flags[i] else lo for i in range(depth))


def read_budgets(path: str | Path, depth: int | None = None) -> dict[int, tuple[int, ...]]:
    """{N: capacity per block} from a budgets JSON in the released format (ValueError naming a bad key);
    `depth` None: the blocks the first entry lists, which every entry must list."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"ScaleKV budgets file {path}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict) or not data:
        raise _fail(path, "the top level", "must be a non-empty object of \"Scale N\" entries")
    out = {}
    for name, entry in data.items():
        m = _SCALE.match(name)
        if not m:
            raise _fail(path, f"key {name!r}", "is not of the form \"Scale N\"")
        out[int(m.group(1))] = caps = _scale(entry, path, name, depth)
        depth = len(caps)
    return out


def budget_entry(si: int) -> int:
    """The "Scale N" entry read after scale index si: N = si + 2, and si = 12 reuses entry 13."""
    return 13 if si == 12 else si + 2
