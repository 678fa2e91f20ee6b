"""Text-to-image cells in a study: which variants take prompts, the prompts they get, and their CLIP score.

A study's `quality.prompts` names a prompt set (harness/eval/prompts.py). A variant whose factory takes
`prompts` (Infinity) is built with the set's first num_samples prompts in file order; the loop's labels index
them, so sample i (label i mod count) was drawn for prompt `prompts[label]`, which is what CLIP scores it
against. Class-conditional variants in the same study ignore the set and get no CLIP score.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import numpy as np

from varbench.harness.core.registry import VARIANTS

__all__ = ["takes_prompts", "study_prompts", "prompt_args", "clip_metrics", "TEST_CLIP"]

TEST_CLIP = "test-clip"  # quality.clip_model for a tiny random CLIP: smoke runs and tests, no files


def takes_prompts(variant: str) -> bool:
    """Whether the registered variant is text-to-image (its factory takes `prompts`)."""
    return "prompts" in inspect.signature(VARIANTS.get(variant)).parameters


@functools.cache
def _prompt_set(name: str, path: str | None, count: int) -> tuple[str, ...]:
    from varbench.harness.eval.prompts import load_prompt_set

    prompts = load_prompt_set(name, path).prompts[:count]
    if not prompts:
        raise ValueError(f"quality.prompts: prompt set {name!r} ({path or 'its default source'}) holds no prompt")
    return tuple(prompts)


def study_prompts(q) -> tuple[str, ...] | None:
    """The prompts of a quality setting (its set's first num_samples, file order), or None without a set."""
    return None if q is None or q.prompts is None else _prompt_set(q.prompts, q.prompts_path, q.num_samples)


def prompt_args(variant: str, variant_args: dict[str, Any], q) -> dict[str, Any]:
    """`prompts=` for a text-to-image variant when the study names a prompt set and the cell's own arguments do
    not already give prompts; {} otherwise."""
    prompts = study_prompts(q)
    if prompts is None or "prompts" in variant_args or not takes_prompts(variant):
        return {}
    return {"prompts": list(prompts)}


def clip_metrics(images: np.ndarray, labels: np.ndarray, q, device: str, seed: int) -> dict[str, Any]:
    """CLIP score of each image against the prompt its label indexes (harness/eval/clip_score.py)."""
    from varbench.harness.eval.clip_score import CLIP_L14, clip_score, load_clip, tiny_clip_embedder

    prompts = study_prompts(q)
    texts = [prompts[int(label) % len(prompts)] for label in labels]
    embed = tiny_clip_embedder(device=device) if q.clip_model == TEST_CLIP else load_clip(q.clip_model or CLIP_L14,
                                                                                           device=device)
    return clip_score(images, texts, embed, bootstrap=q.bootstrap, seed=seed)
