"""Text encoders for text-to-image variants: prompts to per-prompt (len, C) features, cached by content hash.

`flan_t5_xl` is Infinity's encoder (docs/INFINITY_SPEC.md §3.1): `transformers`' T5EncoderModel and its tokenizer
(google/flan-t5-xl), max_length 512 with truncation, `last_hidden_state` in fp32, each prompt's first
len = attention_mask.sum() rows. It is read from a local folder or the Hugging Face cache and downloaded only
when allowed (`allow_download=True` or VARBENCH_DOWNLOAD=1), like every checkpoint. `transformers` is an optional
dependency (`pip install varbench[t2i]`). `precomputed` reads embeddings saved as {prompt: (len, C) tensor};
`test_t5` is a tiny random T5 encoder with a byte tokenizer (no files) for tests.

Embeddings are cached under $VARBENCH_CACHE/text_embeddings/<encoder key>/<sha256 of the prompt>.pt, where the
key hashes the encoder's identity (source and configuration), so a prompt is encoded once per encoder.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from varbench.harness.core.checkpoints import CheckpointError
from varbench.harness.core.hashing import config_hash, text_sha256

__all__ = ["TextEncoder", "byte_tokenizer", "PrecomputedEncoder", "load_t5_encoder", "tiny_t5_encoder", "text_encoder",
           "TEXT_ENCODERS", "embedding_cache_dir"]

FLAN_T5_XL = "google/flan-t5-xl"
MAX_LENGTH = 512  # Infinity's tokenizer call: padding and truncation to 512 tokens


def embedding_cache_dir() -> Path:
    return Path(os.environ.get("VARBENCH_CACHE", Path.home() / ".cache" / "varbench")) / "text_embeddings"


def _transformers():
    """`transformers`, imported with the PyPI `kernels` package it needs: run from the repository root, the
    project's own `kernels/` folder (installed as varbench.kernels) would shadow it."""
    repo_root = os.path.realpath(Path(__file__).resolve().parents[1])
    shadowing = [p for p in sys.path if os.path.realpath(p or os.getcwd()) == repo_root]
    if shadowing and "kernels" not in sys.modules:
        saved = sys.path[:]
        sys.path[:] = [p for p in sys.path if p not in shadowing]
        try:
            importlib.import_module("kernels")  # the PyPI package, when installed
        except ImportError:
            pass
        finally:
            sys.path[:] = saved
    try:
        import transformers
    except ImportError:
        raise ImportError("text encoders need `transformers`, an optional dependency: pip install "
                          "'varbench[t2i]' (or pass precomputed prompt embeddings)") from None
    return transformers


class TextEncoder:
    """A T5 encoder and its tokenizer; `encode` returns one (len_i, C) fp32 tensor per prompt."""

    def __init__(self, model, tokenizer: Callable, key: str, device: str | torch.device = "cpu",
                 max_length: int = MAX_LENGTH, cache: bool = True):
        self.model, self.tokenizer, self.key = model.to(device).eval(), tokenizer, key
        self.device, self.max_length, self.cache = torch.device(device), max_length, cache

    def _path(self, prompt: str) -> Path:
        return embedding_cache_dir() / self.key / f"{text_sha256(prompt)}.pt"

    @torch.inference_mode()
    def _encode(self, prompts: list[str]) -> list[Tensor]:
        tok = self.tokenizer(prompts, max_length=self.max_length, padding="max_length", truncation=True,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return [h[: int(n)].cpu() for h, n in zip(hidden, mask.sum(1))]

    def encode(self, prompts: Sequence[str], batch_size: int = 16) -> list[Tensor]:
        out: dict[int, Tensor] = {}
        if self.cache:
            for i, prompt in enumerate(prompts):
                path = self._path(prompt)
                if path.is_file():
                    out[i] = torch.load(path, map_location="cpu", weights_only=True)
        todo = [i for i in range(len(prompts)) if i not in out]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start: start + batch_size]
            for i, emb in zip(chunk, self._encode([prompts[i] for i in chunk])):
                out[i] = emb
                if self.cache:
                    path = self._path(prompts[i])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{os.getpid()}")
                    torch.save(emb.clone(), tmp)
                    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
        return [out[i] for i in range(len(prompts))]


class PrecomputedEncoder:
    """Prompt embeddings saved beforehand: a .pt file of {prompt: (len, C) tensor}."""

    def __init__(self, path: str | os.PathLike):
        if not Path(path).is_file():
            raise FileNotFoundError(f"prompt embeddings file not found: {path} (a .pt file of {{prompt: (len, C) "
                                    "tensor}})")
        table = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(table, dict) or not all(isinstance(v, Tensor) and v.ndim == 2 for v in table.values()):
            raise ValueError(f"{path} must hold a dict {{prompt: (len, C) tensor}}")
        self.table, self.path = table, Path(path)

    def encode(self, prompts: Sequence[str]) -> list[Tensor]:
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise KeyError(f"{self.path} has no embedding for {len(missing)} prompt(s), e.g. {missing[0]!r}")
        return [self.table[p].float() for p in prompts]


def _downloads_allowed(allow_download: bool | None) -> bool:
    if allow_download is not None:
        return allow_download
    return os.environ.get("VARBENCH_DOWNLOAD", "") not in ("", "0")


def load_t5_encoder(source: str | os.PathLike = FLAN_T5_XL, allow_download: bool | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    cache: bool = True) -> TextEncoder:
    """Flan-T5-XL (or another T5) from a local folder or the Hugging Face cache; downloaded only when allowed.
    `dtype`: None = fp16 on CUDA, as the official run_infinity.py loads it, fp32 on CPU."""
    tf = _transformers()
    local_only = not _downloads_allowed(allow_download)
    dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(source), local_files_only=local_only, legacy=True)
        model = tf.T5EncoderModel.from_pretrained(str(source), local_files_only=local_only).to(dtype)
    except (OSError, ValueError) as err:  # ValueError: huggingface_hub >= 1 on a missing path
        where = ("is not in the local Hugging Face cache and downloads are off" if local_only else
                 "could not be downloaded")
        raise CheckpointError(f"T5 encoder {source} {where} ({str(err).splitlines()[0][:160]}). Download "
                              f"https://huggingface.co/{FLAN_T5_XL} and pass its local folder, allow downloads "
                              "(--download / VARBENCH_DOWNLOAD=1), or pass precomputed prompt embeddings.") from None
    identity = {"source": Path(str(source)).name, "config": model.config.to_dict(), "dtype": str(dtype)}
    return TextEncoder(model, tokenizer, f"t5-{config_hash(identity)}", device, cache=cache)


def byte_tokenizer(vocab: int, eos: int = 1, offset: int = 2) -> Callable:
    """A tokenizer for random test models, called as a Hugging Face tokenizer is: UTF-8 bytes mapped to
    `offset + b % (vocab - 2)`, then `eos`, padding id 0. T5's layout by default (EOS 1); the tiny CLIP puts EOS at
    vocab - 1 (its legacy pooling takes the argmax id) with offset 1."""
    def tokenize(prompts, max_length: int, padding: str = "max_length", truncation: bool = True,
                 return_tensors: str = "pt") -> dict[str, Tensor]:
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(prompts):
            row = [offset + b % (vocab - 2) for b in text.encode()][: max_length - 1] + [eos]
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return {"input_ids": ids, "attention_mask": mask}
    return tokenize


@torch.no_grad()
def tiny_t5_encoder(channels: int = 64, seed: int = 0, device: str | torch.device = "cpu",
                    cache: bool = False) -> TextEncoder:
    """A tiny random T5 encoder (2 layers, width `channels`) with a byte tokenizer: no files needed."""
    tf = _transformers()
    config = tf.T5Config(vocab_size=259, d_model=channels, d_kv=16, d_ff=2 * channels, num_layers=2,
                         num_heads=channels // 16, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = tf.T5EncoderModel(config)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 1.0))
    key = f"test-t5-{config_hash({'channels': channels, 'seed': seed})}"
    return TextEncoder(model, byte_tokenizer(config.vocab_size), key, device, max_length=64, cache=cache)


TEXT_ENCODERS: dict[str, Callable[..., TextEncoder | PrecomputedEncoder]] = {
    "flan_t5_xl": load_t5_encoder,
    "precomputed": PrecomputedEncoder,
    "test_t5": tiny_t5_encoder,
}


def text_encoder(name: str, **kwargs) -> TextEncoder | PrecomputedEncoder:
    """A registered text encoder by name (flan_t5_xl, precomputed, test_t5)."""
    if name not in TEXT_ENCODERS:
        raise KeyError(f"unknown text encoder {name!r}; choose from {', '.join(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[name](**kwargs)
