"""Text encoders: the tiny random T5 encodes prompts to per-prompt (len, C) rows, caches them by content hash
under $VARBENCH_CACHE, precomputed embeddings are read from a file, a missing Flan-T5-XL names what to download,
and string prompts drive test_infinity end to end. Skipped without `transformers` (an optional extra)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from varbench.harness.core.checkpoints import CheckpointError
from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import SampleConfig
from varbench.variants.infinity_build import build_infinity
from varbench.variants.text_encoders import (
    PrecomputedEncoder,
    embedding_cache_dir,
    load_t5_encoder,
    tiny_t5_encoder,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder():
    return tiny_t5_encoder(64)  # cache off: tests turn it on under a temporary $VARBENCH_CACHE


def test_rows_follow_the_token_count_and_the_cache_returns_the_same_tensor(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(encoder, "cache", True)
    first = encoder.encode(["a red circle", "a large blue square on a striped background"])
    assert [e.shape for e in first] == [(13, 64), (44, 64)]  # UTF-8 bytes + EOS, no padding rows
    files = sorted((embedding_cache_dir() / encoder.key).iterdir())
    assert len(files) == 2
    monkeypatch.setattr(encoder, "model", None)  # a cache hit must not run the model
    again = encoder.encode(["a red circle"])
    assert torch.equal(again[0], first[0])


def test_padding_does_not_leak_into_a_prompt(encoder):
    alone = encoder.encode(["stripes"])[0]
    batched = encoder.encode(["stripes", "a much longer prompt that pads the first one"])[0]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_precomputed_embeddings_are_looked_up_by_prompt(tmp_path):
    table = {"a cat": torch.ones(3, 8), "a dog": torch.zeros(5, 8)}
    torch.save(table, tmp_path / "emb.pt")
    enc = PrecomputedEncoder(tmp_path / "emb.pt")
    assert [e.shape for e in enc.encode(["a dog", "a cat"])] == [(5, 8), (3, 8)]
    with pytest.raises(KeyError, match="a bird"):
        enc.encode(["a bird"])


def test_a_missing_flan_t5_names_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="google/flan-t5-xl"):
        load_t5_encoder(allow_download=False)


def test_string_prompts_drive_the_test_model(encoder):
    variant = build_infinity("test", prompts=["a red circle", "a blue square"], negative="blurry",
                             text_encoder=encoder)
    assert variant.num_classes == 2 and variant.negative.shape == (7, 64)
    out = generate(variant, torch.tensor([1, 0]), SampleConfig(cfg=3.0, top_k=900, top_p=0.97), g_seed=0)
    assert out.images.shape == (2, 3, 256, 256) and torch.isfinite(out.images).all()
