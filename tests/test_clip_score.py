"""CLIP score: the formula on closed-form embeddings (identical -> 100, orthogonal -> 0, negative cosine clipped,
a known angle), the bootstrap interval, input checks, a clear error without weights, and a tiny random CLIP
end to end (that part is skipped without `transformers`, the optional extra `t2i`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from varbench.harness.eval import clip_score as cs


def _fixed(image_emb: torch.Tensor, text_emb: torch.Tensor):
    """An embedder returning given rows: the i-th call slice is selected by the images it gets (their indices)."""
    def embed(images, prompts):
        idx = images.long()
        return image_emb[idx], text_emb[idx]
    embed.name = "fixed"
    return embed


def test_pair_scores_closed_form():
    e = torch.eye(3)
    assert torch.allclose(cs.pair_scores(e, 2.5 * e), torch.full((3,), 100.0, dtype=torch.float64))
    assert torch.equal(cs.pair_scores(e, e.roll(1, 0)), torch.zeros(3, dtype=torch.float64))  # orthogonal
    assert torch.equal(cs.pair_scores(e, -e), torch.zeros(3, dtype=torch.float64))  # cos = -1 clipped to 0
    angle = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, math.sqrt(3) / 2]], dtype=torch.float64)  # 60 degrees
    assert cs.pair_scores(*angle).item() == pytest.approx(50.0, abs=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        cs.pair_scores(torch.ones(2, 3), torch.ones(2, 4))


def test_clip_score_mean_interval_and_batching():
    # pairs with cos 1, 0, -1 (clipped) and 0.5: mean of 100, 0, 0, 50 = 37.5
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    images, prompts = torch.arange(4), ["a", "b", "c", "d"]
    out = cs.clip_score(images, prompts, _fixed(img, txt), batch_size=3, bootstrap=200, seed=0)
    assert out["clip_score"] == pytest.approx(37.5, abs=1e-12)
    assert out["clip_score_n"] == 4 and out["clip_model"] == "fixed"
    lo, hi = out["clip_score_ci95"]
    assert 0.0 <= lo < 37.5 < hi <= 100.0
    again = cs.clip_score(images, prompts, _fixed(img, txt), batch_size=1, bootstrap=200, seed=0)
    assert again == out  # batching does not change the pairs; the seed fixes the resamples
    assert cs.clip_score(images, prompts, _fixed(img, txt), bootstrap=0)["clip_score_ci95"] is None
    same = cs.clip_score(images, prompts, _fixed(img, img), bootstrap=50)
    assert same["clip_score"] == pytest.approx(100.0) and same["clip_score_ci95"] == pytest.approx([100.0, 100.0])


def test_clip_score_needs_one_prompt_per_image():
    with pytest.raises(ValueError, match="one prompt per image"):
        cs.clip_score(torch.arange(3), ["a", "b"], _fixed(torch.eye(3), torch.eye(3)))


def test_image_layouts_agree():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    as_float = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    assert np.array_equal(cs._as_uint8_nhwc(as_float), u8)
    assert np.array_equal(cs._as_uint8_nhwc(torch.from_numpy(u8)), u8)
    assert np.array_equal(cs._as_uint8_nhwc(u8.transpose(0, 3, 1, 2)), u8)


def test_missing_weights_name_the_model_and_where_to_get_it(monkeypatch, tmp_path):
    tf = pytest.importorskip("transformers")

    def not_cached(source, local_files_only):  # as from_pretrained fails on a hub id absent from the cache
        assert local_files_only  # downloads are off: the loader must not reach the network
        raise OSError(f"Can't load image processor for '{source}'.")
    monkeypatch.setattr(tf.CLIPProcessor, "from_pretrained", not_cached)
    with pytest.raises(cs.CheckpointError) as err:
        cs.load_clip(allow_download=False)
    msg = str(err.value)
    assert "CLIP model openai/clip-vit-large-patch14 is not in the local Hugging Face cache" in msg
    assert "https://huggingface.co/openai/clip-vit-large-patch14" in msg and "VARBENCH_DOWNLOAD=1" in msg


def test_missing_local_folder_is_named(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(cs.CheckpointError) as err:
        cs.load_clip(tmp_path / "clip", allow_download=False)  # real transformers, a folder that is not there
    msg = str(err.value)
    assert f"CLIP model {tmp_path / 'clip'} is not a folder holding a CLIP model" in msg
    assert "https://huggingface.co/openai/clip-vit-large-patch14" in msg


def test_missing_transformers_says_how_to_install(monkeypatch):
    def no_transformers():
        raise ImportError("no transformers")
    monkeypatch.setattr(cs, "_transformers", no_transformers)
    with pytest.raises(ImportError, match=r'pip install "varbench\[t2i\]"'):
        cs.tiny_clip_embedder()


def test_tiny_random_clip_end_to_end():
    pytest.importorskip("transformers")
    embed = cs.tiny_clip_embedder(seed=3)  # with transformers 4.57 its cosines here are mixed: 3 > 0, 1 < 0
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a red disc", "a blue square", "a green triangle", "dots"]
    img, txt = embed(images, prompts)
    assert img.shape == txt.shape == (4, 16) and torch.isfinite(img).all() and torch.isfinite(txt).all()
    out = cs.clip_score(images, prompts, embed, bootstrap=20)
    assert 0.0 <= out["clip_score"] <= 100.0 and math.isfinite(out["clip_score"])
    assert out["clip_model"] == "test-clip-3"
    # the score is 100 * mean(max(cos, 0)) of these embeddings, computed here independently
    cos = (torch.nn.functional.normalize(img.double(), dim=1) * torch.nn.functional.normalize(txt.double(), dim=1))
    assert out["clip_score"] == pytest.approx(100 * cos.sum(1).clamp(min=0).mean().item(), abs=1e-9)
    assert not torch.allclose(txt[0], txt[1])  # prompts are told apart
    state = torch.get_rng_state()
    assert torch.equal(cs.tiny_clip_embedder(seed=3)(images, prompts)[1], txt)  # seeded: the same model
    assert torch.equal(torch.get_rng_state(), state)  # and the caller's generator is left alone
