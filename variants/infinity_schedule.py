"""Infinity's scale schedules (every aspect template, pn 0.06M to 1M) and its 2-D RoPE grid positions.

Written from docs/INFINITY_SPEC.md §1 and §3.4 (FoundationVision/Infinity@4c27bbb5
infinity/utils/dynamic_resolution.py and infinity/models/basic.py, RoPE-2D "star" mode). The (h, w) tables are
facts of the released models (each template's 13 scales); nothing is copied from that code.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TEMPLATES", "PN_SCALES", "template_for", "scale_schedule", "rope_positions", "rope_angles",
           "ROPE_GRID"]

# h/w ratio -> the 13 (h, w) token grids of its 1M schedule (latent stride 16). The inverse ratios use (w, h).
_RATIO_HWS: dict[float, tuple[tuple[int, int], ...]] = {
    1.0: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
          (48, 48), (64, 64)),
    1.25: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
           (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)),
    1.5: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
          (63, 42), (78, 52)),
    1.75: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
           (70, 40), (84, 48)),
    2.0: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
          (74, 37), (90, 45)),
    2.5: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
          (80, 32), (100, 40)),
    3.0: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
          (90, 30), (111, 37)),
}


def _templates() -> dict[float, tuple[tuple[int, int], ...]]:
    """Every template in the official dict order: each ratio, then its inverse int(1/r·1000)/1000 with (w, h)."""
    out: dict[float, tuple[tuple[int, int], ...]] = {}
    for ratio, hws in _RATIO_HWS.items():
        out[ratio] = hws
        if ratio != 1.0:
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return out


TEMPLATES = _templates()  # 15 templates: 1.0, 1.25, 0.8, 1.333, 0.75, ...
PN_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}  # pn -> first n scales of the template
ROPE_GRID = 128  # the official position table is 128×128 (2048 px / stride 16)


def template_for(h_div_w: float) -> float:
    """The template nearest to h/w (the first in dict order on a tie, as np.argmin picks)."""
    if not h_div_w > 0:
        raise ValueError(f"h_div_w = {h_div_w!r} is invalid: it must be a positive aspect ratio (height / width)")
    return min(TEMPLATES, key=lambda t: abs(t - h_div_w))


def scale_schedule(h_div_w: float = 1.0, pn: str = "1M") -> tuple[tuple[int, int], ...]:
    """(h, w) token grids of one generation; the image is 16·(h_last, w_last) pixels."""
    if pn not in PN_SCALES:
        raise ValueError(f"pn = {pn!r} is unknown; choose from {', '.join(PN_SCALES)}")
    return TEMPLATES[template_for(h_div_w)][: PN_SCALES[pn]]


def rope_positions(schedule: tuple[tuple[int, int], ...], template: float | None = None) -> Tensor:
    """(L, 2) int64 (row, col) RoPE grid positions of every token of `schedule`, row-major per scale.

    Positions are relative to the LAST grid of the template's 1M schedule whatever pn is ("star" mode,
    rope2d_normalized_by_hw=2): row = round(y·H1/h) in fp32, rounded half to even as torch.round does.
    """
    template = template_for(schedule[-1][0] / schedule[-1][1]) if template is None else template
    big_h, big_w = TEMPLATES[template][-1]
    rows = []
    for h, w in schedule:
        ys = (torch.arange(h) * (big_h / h)).round().long()  # int64 * python float -> fp32, as the official
        xs = (torch.arange(w) * (big_w / w)).round().long()
        rows.append(torch.stack((ys.view(h, 1).expand(h, w), xs.view(1, w).expand(h, w)), -1).reshape(-1, 2))
    return torch.cat(rows)


def rope_angles(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (L, head_dim / 2) fp32: angles (row·inv_freq, col·inv_freq) per channel pair."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))  # (half / 2,)
    grid = torch.arange(ROPE_GRID, dtype=torch.int64).float()
    table = torch.outer(grid, inv_freq)  # (128, half / 2): position · theta, the official table's fp32 products
    angles = torch.cat((table[positions[:, 0]], table[positions[:, 1]]), dim=-1)  # (L, half)
    return angles.cos(), angles.sin()
