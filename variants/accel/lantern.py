"""LANTERN, relaxed speculative acceptance (Jang et al., ICLR 2025, arXiv:2410.03355; docs/VARIANTS.md §10), here
on SJD's training-free Jacobi drafts (variants/accel/sjd.py) instead of the paper's trained EAGLE drafter, whose
LlamaGen c2i weights are not released; written from jadohu/LANTERN@3a56e451 (models/ea_model_llamagen.py
`evaluate_posterior`, entrypoints/generate_codebook.py, entrypoints/generate_images.py); nothing is copied.

The relaxation changes the acceptance ratio only. For a draft x, its latent neighbours are the codebook entries
nearest to x's (L2 distance between the VQ codebook's embedding rows, x itself excluded, as generate_codebook.py);
of its first k, the largest prefix whose target mass (cumulative sum in proximity order) is <= δ (for δ > 1:
<= (δ − 1)·p(x)) is pooled into x: p̃(x) = p(x) + that mass, and x is accepted with min(1, p̃(x)/q(x)). After a
rejection the replacement is drawn from norm(max(0, p − q')), where q' is q with x's first k + 1 neighbours set to
0 (the official `q[nearest_latents[xi, :lantern_k + 1]] = 0`). Both enter through sampling_verify.verify_drafts'
hooks (`p_accept_probs`, `residual_q`), so the loop's stream is consumed exactly as SJD's.

Defaults: k = 1000, δ = 0.1, the code's (generate_images.py `--lantern_k`, `--lantern_delta`); the paper's
LlamaGen runs are text-to-image, so for c2i they are unverified (its run.sh also uses k = 10, δ = 5). The SJD
arguments (window, init, init_seed) keep SJD's defaults. One deviation, so that δ = 0 is SJD exactly: q' zeroes
the neighbourhood only where the pooled mass is > 0 (the official code zeroes it whenever the prefix is non-empty,
which zero-mass neighbours, e.g. outside top-k, make it at δ = 0).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .sjd import SJD

__all__ = ["Lantern", "lantern", "nearest_codes"]

DISTANCE_CHUNK = 1024  # codebook rows per cdist block: a 16384² distance matrix would take 1 GiB at once


def nearest_codes(codebook: Tensor, k: int) -> Tensor:
    """(V, k') int64: per code, the k' = min(k, V − 1) other codes in order of L2 distance (nearest first)."""
    vocab = codebook.shape[0]
    k = min(k, vocab - 1)
    rows = []
    for start in range(0, vocab, DISTANCE_CHUNK):
        block = torch.cdist(codebook[start:start + DISTANCE_CHUNK].float(), codebook.float())  # (c, V)
        own = torch.arange(start, start + block.shape[0], device=codebook.device)
        block[torch.arange(block.shape[0]), own] = torch.inf  # the diagonal: a code is not its own neighbour
        rows.append(torch.topk(block, k, dim=-1, largest=False).indices)
    return torch.cat(rows)


class Lantern(SJD):
    name = "lantern"
    defaults: ClassVar[dict[str, Any]] = {**SJD.defaults, "k": 1000, "delta": 0.1}
    unverified: ClassVar[tuple[str, ...]] = (*SJD.unverified, "k", "delta")

    def check(self) -> None:
        super().check()
        delta = self.args["delta"]
        if isinstance(self.args["k"], bool) or not isinstance(self.args["k"], int) or self.args["k"] < 0:
            raise ValueError(f"acceleration 'lantern': k must be an integer >= 0, got {self.args['k']!r}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta >= 0:
            raise ValueError(f"acceleration 'lantern': delta must be a number >= 0, got {delta!r}")
        self._table: tuple[int, Tensor] | None = None

    def neighbours(self, variant) -> Tensor:
        """(V, min(k + 1, V − 1)) neighbour table of the variant's codebook, built once per codebook."""
        weight = variant.vq.quantize.embedding.weight
        if self._table is None or self._table[0] != id(weight):
            self._table = (id(weight), nearest_codes(weight.detach(), self.args["k"] + 1))
        return self._table[1]

    def relaxation(self, variant, q: Tensor) -> tuple[Any, Any]:
        k, delta = self.args["k"], float(self.args["delta"])
        if k == 0:
            return None, None
        table = self.neighbours(variant)

        def pooled(p: Tensor, drafts: Tensor) -> Tensor:  # (B, L): target mass pooled into each draft
            mass = p.gather(-1, table[drafts][..., :k]).cumsum(dim=-1)  # (B, L, k) in proximity order
            px = p.gather(-1, drafts.unsqueeze(-1))  # (B, L, 1)
            bound = (delta - 1.0) * px if delta > 1.0 else torch.full_like(px, delta)
            return torch.where(mass <= bound, mass, torch.zeros_like(mass)).amax(dim=-1)  # largest prefix

        def accept_mass(p: Tensor, drafts: Tensor) -> Tensor:
            return p.gather(-1, drafts.unsqueeze(-1)).squeeze(-1) + pooled(p, drafts)

        def residual_q(p: Tensor, drafts: Tensor) -> Tensor:
            zeroed = q.float().scatter(-1, table[drafts], 0.0)  # the first k + 1 neighbours set to 0
            return torch.where((pooled(p, drafts) > 0).unsqueeze(-1), zeroed, q.float())

        return accept_mass, residual_q


def lantern(**kwargs: Any) -> Lantern:
    """LANTERN, relaxed speculative acceptance (arXiv:2410.03355): SJD's drafts accepted against the target mass
    pooled over each draft's latent neighbours (k nearest codes, total-variation budget delta; delta = 0 is SJD).
    Args: k, delta, and SJD's window, init, init_seed."""
    return Lantern(**kwargs)
