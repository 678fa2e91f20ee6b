"""The engine on random models of other shapes than the fixture's: KV-cached logits equal teacher-forced
logits + CFG, greedy tokens are their argmax, the engine equals the reference loop, and seeds determine all."""

import pytest
import torch

from varbench.harness.conformance import RecordGuided
from varbench.harness.core.kv_cache import StaticKVCache
from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import SampleConfig
from varbench.variants.loading import random_var_net, random_vqvae
from varbench.variants.var import VAR, EngineConfig
from varbench.variants.var_model import PATCH_NUMS, VARConfig
from varbench.variants.vqvae import VQVAEConfig

SHAPES = {
    "d3_b3": VARConfig(depth=3),
    "d4_b1_w96": VARConfig(depth=4, width=96, heads=3),
    "d2_512px_shared_adaln": VARConfig(depth=2, shared_aln=True, patch_nums=PATCH_NUMS[2240]),
}


def _variant(cfg: VARConfig, engine: EngineConfig = EngineConfig(), seed: int = 0) -> VAR:
    return VAR(random_var_net(cfg, seed), random_vqvae(VQVAEConfig(ch=32), seed), engine)


def _teacher_forced_guided(v: VAR, labels: torch.Tensor, tokens: list[torch.Tensor], cfg: float) -> list:
    with torch.inference_mode():
        x_in = v.vae.tokens_to_var_input(tokens, v.patch_nums)
        cond = v.net(labels, x_in)
        uncond = v.net(torch.full_like(labels, v.num_classes), x_in)
    last = len(v.patch_nums) - 1
    return [(1 + cfg * si / last) * cond[:, b:e] - cfg * si / last * uncond[:, b:e]
            for si, (b, e) in enumerate(v.net.begin_ends)]


@pytest.mark.parametrize("shape, batch, cfg, seed", [
    ("d3_b3", 3, 2.5, 7), ("d4_b1_w96", 1, 4.0, 123), ("d2_512px_shared_adaln", 2, 1.5, 0)])
def test_kv_cached_logits_equal_teacher_forced_plus_cfg(shape, batch, cfg, seed):
    v = _variant(SHAPES[shape], seed=seed)
    labels = torch.arange(batch) * 97 % 1000
    rec = RecordGuided(v, cfg)
    out = generate(rec, labels, SampleConfig(cfg=cfg, top_k=1, top_p=0.0), g_seed=seed)
    want = _teacher_forced_guided(v, labels, out.tokens, cfg)
    for si, (got, ref) in enumerate(zip(rec.logits, want)):
        assert (got - ref).abs().max() < 3e-5 * max(1.0, ref.abs().max().item()), f"scale {si}"
        assert torch.equal(out.tokens[si], ref.argmax(-1))  # greedy = argmax of the guided logits


@pytest.mark.parametrize("sampling", [SampleConfig(), SampleConfig(more_smooth=True),
                                      SampleConfig(top_k=(600,) * 10, top_p=0.96, temperature=(1.1,) * 7 + (1.0,) * 3)])
def test_engine_equals_reference_loop_in_fp32(sampling):
    labels = torch.tensor([3, 1000, 42])
    runs = [generate(_variant(SHAPES["d3_b3"], engine), labels, sampling, g_seed=5)
            for engine in (EngineConfig(), EngineConfig.reference())]
    for a, b in zip(runs[0].tokens, runs[1].tokens):
        assert torch.equal(a, b)
    assert (runs[0].images - runs[1].images).abs().max() < 1e-4  # NHWC vs NCHW decode order


def test_same_seed_same_images_other_seed_other_images():
    v = _variant(SHAPES["d3_b3"])
    labels = torch.tensor([1, 2])
    a, b, c = (generate(v, labels, SampleConfig(), g_seed=s) for s in (11, 11, 12))
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)) and torch.equal(a.images, b.images)
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))
    assert a.images.shape == (2, 3, 256, 256) and 0 <= a.images.min() and a.images.max() <= 1


def test_labels_like_the_official_sampler():
    v = _variant(SHAPES["d3_b3"])
    drawn = generate(v, None, SampleConfig(), g_seed=3, batch=4).labels
    again = torch.multinomial(torch.full((1000,), 1e-3), 4, replacement=True,
                              generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, again)  # drawn first from the call's stream
    assert generate(v, -1, SampleConfig(), batch=2).labels.tolist() == [1000, 1000]


def test_static_cache_holds_every_token_in_place_without_growing():
    v = _variant(SHAPES["d3_b3"])
    out = generate(v, torch.tensor([1, 2]), SampleConfig(), g_seed=0)
    cache = out.state.cache
    assert isinstance(cache, StaticKVCache) and cache.length == 680
    c = v.cfg
    per_token = 2 * 2 * 2 * c.width * c.depth * 4  # K and V, both CFG halves, batch 2, fp32
    assert out.state.kv_bytes == [per_token * e for _, e in v.net.begin_ends]
    assert cache.allocated_bytes == per_token * 680
    buffer = cache.k.data_ptr()
    generate(v, torch.tensor([3, 4]), SampleConfig(), g_seed=1)
    assert v.kv_buffer.k.data_ptr() == buffer  # reused across calls of the same batch size


def test_bf16_engine_error_is_that_of_the_official_autocast():
    """Per-step bf16 logits against fp32 teacher-forced logits on the same tokens (no cascade): the engine's
    bf16 weights must cost no more accuracy than the official fp32-weights-under-autocast path."""
    labels = torch.tensor([5, 6])
    errors = {}
    for engine in (EngineConfig("bf16"), EngineConfig.reference("bf16")):
        v = _variant(SHAPES["d3_b3"], engine)
        rec = RecordGuided(v, 1.5)
        out = generate(rec, labels, SampleConfig(cfg=1.5), g_seed=0)
        assert out.images.dtype == torch.float32 and out.images.isfinite().all()
        exact = _variant(SHAPES["d3_b3"])  # same seed: same weights, fp32
        want = _teacher_forced_guided(exact, labels, out.tokens, 1.5)
        errors[engine.weights_in_precision] = max(
            ((g - w).abs().max() / w.abs().max()).item() for g, w in zip(rec.logits, want))
    assert errors[True] < 0.05
    assert errors[True] <= 1.5 * errors[False] + 1e-3, errors


@pytest.mark.slow
def test_compiled_step_gives_the_eager_tokens():
    labels = torch.tensor([7, 8])
    eager = generate(_variant(SHAPES["d3_b3"]), labels, SampleConfig(), g_seed=2)
    compiled = generate(_variant(SHAPES["d3_b3"], EngineConfig(compile=True)), labels, SampleConfig(), g_seed=2)
    assert all(torch.equal(a, b) for a, b in zip(eager.tokens, compiled.tokens))
