"""CLIP score of generated images against their prompts, with a 95% bootstrap interval.

Definition, per (image, prompt) pair: 100 · max(cos(E_image, E_text), 0), averaged over pairs. This is the
form text-to-image papers report and the one torchmetrics' `CLIPScore` implements
(https://lightning.ai/docs/torchmetrics/stable/multimodal/clip_score.html), scaled to 0..100. Hessel et al.'s
CLIP-S (arXiv:2104.08718, §3) is w · max(cos, 0) with w = 2.5, made for caption evaluation (it stretches their
observed cosines to about [0, 1]); we report 100 · cos, not CLIP-S, so our numbers sit beside the T2I tables
(CLIP-S = 0.025 × our score for the same model). The 95% interval is the project's bias-corrected percentile
bootstrap over pairs (harness/eval/resampling.py: `bootstrap_draws`, `interval`), as for FID.

Model: `transformers`' CLIPModel + CLIPProcessor, default `openai/clip-vit-large-patch14` (ViT-L/14 at 224 px:
torchmetrics' default). Which CLIP each T2I paper used (ViT-L/14 vs ViT-B/32 vs open_clip ViT-H) is
UNVERIFIED here and changes the numbers by several points: every record names its model, and only scores with
the same `clip_model` may be compared. Weights come from a local folder or the Hugging Face cache and are
downloaded only when allowed (`allow_download=True` or VARBENCH_DOWNLOAD=1), as the T5 encoder's
(variants/text_encoders.py). `transformers` is the optional extra `t2i`.

The embedding step is injectable: `clip_score(images, prompts, embed)` takes any `embed(images, prompts) ->
(image_emb, text_emb)`; `tiny_clip_embedder` is a small random CLIP (no files) for tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from varbench.harness.core.checkpoints import CheckpointError
from varbench.harness.eval.resampling import bootstrap_draws, interval
from varbench.variants.text_encoders import _downloads_allowed, _transformers, byte_tokenizer

__all__ = [
    "CLIP_L14",
    "CLIP_MAX_TOKENS",
    "CLIPEmbedder",
    "Embed",
    "clip_score",
    "load_clip",
    "pair_scores",
    "tiny_clip_embedder",
]

CLIP_L14 = "openai/clip-vit-large-patch14"
CLIP_MAX_TOKENS = 77  # CLIP's text context: longer prompts are truncated, as every CLIP score tool does

Embed = Callable[[Tensor, Sequence[str]], tuple[Tensor, Tensor]]


def _t2i():
    try:
        return _transformers()
    except ImportError:
        raise ImportError("CLIP score needs `transformers`, an optional dependency: pip install "
                          "\"varbench[t2i]\"") from None


def pair_scores(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """100 · max(cos, 0) for each row pair, float64 (N,)."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"embeddings must be two (N, D) tensors of one shape, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=1)
    return 100.0 * cos.clamp(min=0.0)


def _as_uint8_nhwc(images: Tensor | np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) as saved in .npz files, or float (N, 3, H, W) in [0, 1] as `decode` returns."""
    x = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, 3) uint8 or (N, 3, H, W) float, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x if x.shape[-1] == 3 else x.transpose(0, 2, 3, 1)
    if x.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, H, W) in [0, 1], got shape {x.shape}")
    return np.clip(np.rint(x.transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)


def _features(out) -> Tensor:
    # transformers 4.x returns the projected embeddings; some later versions wrap them in an output object
    # whose pooler_output holds them (unverified across versions: the tiny-CLIP test pins the 4.x behaviour)
    return out if isinstance(out, Tensor) else out.pooler_output


class CLIPEmbedder:
    """A CLIPModel with its image processor and tokenizer: `(images, prompts) -> (image_emb, text_emb)`."""

    def __init__(self, model, image_processor, tokenizer: Callable, name: str, device: str | torch.device = "cpu",
                 max_tokens: int = CLIP_MAX_TOKENS):
        self.model, self.image_processor, self.tokenizer = model.to(device).eval(), image_processor, tokenizer
        self.name, self.device, self.max_tokens = name, torch.device(device), max_tokens

    @torch.inference_mode()
    def __call__(self, images: Tensor | np.ndarray, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        pixels = self.image_processor(images=list(_as_uint8_nhwc(images)), return_tensors="pt")["pixel_values"]
        dtype = next(self.model.parameters()).dtype
        img = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, dtype)))
        tok = self.tokenizer(list(prompts), max_length=self.max_tokens, padding="max_length", truncation=True,
                             return_tensors="pt")
        txt = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                     attention_mask=tok["attention_mask"].to(self.device)))
        return img.float().cpu(), txt.float().cpu()


def load_clip(source: str | os.PathLike = CLIP_L14, allow_download: bool | None = None,
              device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> CLIPEmbedder:
    """CLIP from a local folder or the Hugging Face cache; downloaded only when allowed. `dtype`: None = fp16 on
    CUDA, fp32 on CPU."""
    tf = _t2i()
    local_only = not _downloads_allowed(allow_download)
    dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    try:
        processor = tf.CLIPProcessor.from_pretrained(str(source), local_files_only=local_only)
        model = tf.CLIPModel.from_pretrained(str(source), local_files_only=local_only).to(dtype)
    except (OSError, ValueError) as err:  # ValueError: huggingface_hub >= 1 on a missing path
        local = Path(str(source)).is_absolute() or str(source).startswith(".") or Path(str(source)).exists()
        if local:
            where, hub_id = "is not a folder holding a CLIP model and processor", CLIP_L14
        else:
            hub_id = str(source)
            where = ("is not in the local Hugging Face cache and downloads are off" if local_only else
                     "could not be downloaded")
        raise CheckpointError(f"CLIP model {source} {where} ({str(err).splitlines()[0][:160]}). Download "
                              f"https://huggingface.co/{hub_id} and pass its local folder, or allow downloads "
                              "(--download / VARBENCH_DOWNLOAD=1).") from None
    return CLIPEmbedder(model, processor.image_processor, processor.tokenizer, Path(str(source)).name, device)


def tiny_clip_embedder(seed: int = 0, image_size: int = 32, width: int = 32, projection: int = 16,
                       device: str | torch.device = "cpu") -> CLIPEmbedder:
    """A small random CLIP (1 layer per tower, `width` wide, patch 8) with a byte tokenizer: no files needed."""
    tf = _t2i()
    vocab, context = 259, 32
    config = tf.CLIPConfig(
        text_config={"vocab_size": vocab, "hidden_size": width, "intermediate_size": 2 * width,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": context,
                     "pad_token_id": 0, "bos_token_id": vocab - 2,
                     "eos_token_id": vocab - 1},  # pooling reads the EOS position
        vision_config={"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": 8},
        projection_dim=projection)
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global generator: keep the caller's
        torch.manual_seed(seed)
        model = tf.CLIPModel(config)
    processor = tf.CLIPImageProcessor(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    tokenizer = byte_tokenizer(vocab, eos=vocab - 1, offset=1)  # EOS the largest id: CLIP's legacy pooling
    return CLIPEmbedder(model, processor, tokenizer, f"test-clip-{seed}", device, max_tokens=context)


def clip_score(images: Tensor | np.ndarray, prompts: Sequence[str], embed: Embed, batch_size: int = 32,
               bootstrap: int = 100, seed: int = 0) -> dict[str, Any]:
    """Mean CLIP score of image i against prompt i, its 95% bootstrap interval (None when bootstrap = 0), the
    number of pairs and the model's name (`embed.name`, or the callable's name)."""
    n = len(prompts)
    if len(images) != n or n == 0:
        raise ValueError(f"need one prompt per image and at least one pair, got {len(images)} images and {n} prompts")
    chunks = [embed(images[i: i + batch_size], prompts[i: i + batch_size]) for i in range(0, n, batch_size)]
    per_pair = pair_scores(torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])).numpy()
    point = float(per_pair.mean())
    draws = bootstrap_draws({"clip": lambda idx: {"clip_score": float(per_pair[idx].mean())}}, ["clip_score"], n,
                            bootstrap, seed)
    return {"clip_score": point, "clip_score_ci95": interval(draws["clip_score"], point) if bootstrap > 0 else None,
            "clip_score_n": n, "clip_model": getattr(embed, "name", getattr(embed, "__name__", repr(embed)))}
