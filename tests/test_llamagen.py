"""LlamaGen (raster AR): architecture and parameter counts of the released sizes, the 2-D RoPE table, the raster
sampler's semantics (CFG before temperature, HF top-k/top-p, the multinomial's stream), cfg_interval, loading of the
released file layouts and its refusals, and generation through the one loop (engine = reference)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import varbench.variants  # noqa: F401  (registers the variants)
from varbench.harness import SampleConfig, generate
from varbench.harness.core.checkpoints import CheckpointError
from varbench.harness.core.registry import VARIANTS, create_variant
from varbench.harness.core.sampling import ScaleSampling
from varbench.harness.core.sampling_raster import (
    filter_hf_top_k_top_p_,
    guide_raster,
    sample_raster,
)
from varbench.variants.engine import EngineConfig
from varbench.variants.llamagen import TEST_CONFIG, build_llamagen, cfg_steps
from varbench.variants.llamagen_loading import load_llamagen_net, random_llamagen_net
from varbench.variants.llamagen_model import (
    SIZES,
    LlamaGenConfig,
    apply_rope,
    param_count_meta,
    rope_table_2d,
)
from varbench.variants.llamagen_vq import LlamaGenVQ, VQConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _closed_form_params(layers: int, width: int, vocab: int = 16384, classes: int = 1000) -> int:
    """Class table (with the null row) + token table + per layer (wqkv, wo, SwiGLU, two norms) + norm + head."""
    hidden = int(2 * 4 * width / 3)
    hidden += (-hidden) % 256
    per_layer = 3 * width * width + width * width + 3 * width * hidden + 2 * width
    return (classes + 1) * width + vocab * width + layers * per_layer + width + vocab * width


# README @ce98ec41: GPT-B 111M, L 343M, XL 775M, XXL 1.4B, 3B 3.1B
README_PARAMS = {"b": 111e6, "l": 343e6, "xl": 775e6, "xxl": 1.4e9, "3b": 3.1e9}
EXACT = {"b": 110_888_448, "l": 342_910_976, "xl": 774_699_520, "xxl": 1_410_972_672, "3b": 3_096_659_200}


@pytest.mark.parametrize("size", SIZES)
def test_released_sizes_have_exact_parameter_counts(size):
    layers, heads, width = SIZES[size]
    for grid in (16, 24):  # the grid changes no parameter (RoPE is a table)
        count = param_count_meta(LlamaGenConfig(layers, heads, width, block_size=grid * grid))
        assert count == EXACT[size] == _closed_form_params(layers, width)
    digits = 2 if README_PARAMS[size] >= 1e9 else 3  # "1.4B" / "111M"
    assert float(f"{EXACT[size]:.{digits}g}") == README_PARAMS[size]


def test_vq_tokenizers_have_the_released_sizes():
    with torch.device("meta"):
        vq16, vq8 = LlamaGenVQ(VQConfig()), LlamaGenVQ(VQConfig(ch_mult=(1, 2, 2, 4)))
    assert sum(p.numel() for p in vq16.parameters()) == 71_883_403  # README: 72M
    assert sum(p.numel() for p in vq8.parameters()) == 70_109_835  # README: 70M
    assert vq16.quantize.codebook_used.shape == (65536,)


def test_ffn_widths_of_the_spec():
    assert [LlamaGenConfig(1, 1, d).ffn_hidden for d in (64, 768, 1024, 1280)] == [256, 2048, 2816, 3584]
    assert LlamaGenConfig(24, 32, 3200).ffn_hidden == 8704 and LlamaGenConfig(24, 32, 3200).head_dim == 100


def test_rope_table_turns_rows_then_columns_and_zeroes_the_class_position():
    cfg = LlamaGenConfig(1, 2, 64, block_size=256)  # head_dim 32: 8 row pairs, 8 column pairs
    table = rope_table_2d(cfg)
    assert table.shape == (257, 16, 2) and not table[0].any()
    freqs = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    r, c = 5, 11
    angles = torch.cat([r * freqs, c * freqs])
    torch.testing.assert_close(table[1 + r * 16 + c].double(), torch.stack([angles.cos(), angles.sin()], -1),
                               atol=1e-6, rtol=0)
    x = torch.randn(1, 2, 1, 32)
    out = apply_rope(x, table[:2])
    assert not out[:, 0].any()  # the class position's query and key are zero vectors
    pair = x[0, 1, 0].view(16, 2)  # image token 0 (row 0, column 0): identity
    torch.testing.assert_close(out[0, 1, 0].view(16, 2), pair)


def test_guidance_is_on_raw_logits_and_only_above_one():
    cond, uncond = torch.tensor([[[2.0, 0.0, 1.0]]]), torch.tensor([[[1.0, 1.0, 1.0]]])
    both = torch.cat([cond, uncond])
    torch.testing.assert_close(guide_raster(both, True, 3.0), uncond + (cond - uncond) * 3.0)
    assert torch.equal(guide_raster(both, True, 1.0), cond)  # cfg <= 1: no guidance, the conditional rows
    assert torch.equal(guide_raster(cond, False, 3.0), cond)


def test_hf_top_k_keeps_ties_and_top_p_keeps_the_crossing_token():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, -1.0]])
    kept = filter_hf_top_k_top_p_(logits.clone(), 2, 1.0).isfinite()
    assert kept.tolist() == [[True, True, True, False, False]]  # the tie at the 2nd value survives
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert filter_hf_top_k_top_p_(p.clone(), 0, 0.6).isfinite().tolist() == [[True, True, False, False]]
    assert filter_hf_top_k_top_p_(p.clone(), 0, 0.4).isfinite().tolist() == [[True, False, False, False]]
    assert filter_hf_top_k_top_p_(p.clone(), 0, 0.85).isfinite().tolist() == [[True, True, True, False]]


def test_temperature_divides_before_top_p():
    """log-probs of (0.5, 0.3, 0.2) at T = 0.5 become (25/38, 9/38, 4/38): the cumulative 34/38 crosses top-p 0.8 at
    the second token, so two tokens stay, renormalised to (25/34, 9/34)."""
    logits = torch.tensor([[[0.5, 0.3, 0.2]]]).log()
    s = ScaleSampling(top_k=0, top_p=0.8, temperature=0.5)
    draw = sample_raster(logits.clone(), False, 0.0, s, torch.Generator().manual_seed(0))
    assert draw.logits.isfinite().tolist() == [[[True, True, False]]]
    torch.testing.assert_close(draw.logits.softmax(-1)[0, 0, :2], torch.tensor([25 / 34, 9 / 34]))


def test_multinomial_is_the_exponential_race_of_the_stream():
    """On CPU torch.multinomial(p, 1) == argmax(p / E), E ~ Exp(1) from the same generator (the spec's replay)."""
    logits = torch.randn(4, 1, 50, generator=torch.Generator().manual_seed(3)) * 2
    s = ScaleSampling(top_k=0, top_p=1.0, temperature=0.9)
    tokens = sample_raster(logits.clone(), False, 0.0, s, torch.Generator().manual_seed(7)).tokens
    probs = (logits / 0.9).softmax(-1).view(4, 50)
    race = probs / torch.empty_like(probs).exponential_(generator=torch.Generator().manual_seed(7))
    assert torch.equal(tokens.view(4), race.argmax(-1))


def test_cfg_interval_marks_the_official_steps():
    assert cfg_steps(256, -1) == [True] * 256
    flags = cfg_steps(256, 100)  # decode step i (token i + 1) is guided while i <= 100
    assert flags[:102] == [True] * 102 and flags[102:] == [False] * 154
    assert cfg_steps(4, 0) == [True, True, False, False]


@pytest.fixture(scope="module")
def tiny():
    return build_llamagen("test", weights="random", vae="random", vae_ch=32, seed=3)


def _teacher_forced_argmax(variant, labels, tokens, cfg, guided_steps):
    with torch.inference_mode():
        cond = variant.net.teacher_forced(tokens, labels)
        uncond = variant.net.teacher_forced(tokens, torch.full_like(labels, variant.num_classes))
    use = torch.tensor(guided_steps)[None, :, None]
    return torch.where(use, uncond + (cond - uncond) * cfg, cond).argmax(-1)


def test_greedy_with_cfg_and_cfg_interval_follow_the_spec(tiny):
    """Each greedy token is the argmax of the guided teacher-forced logits where its step is guided, of the
    conditional ones past cfg_interval; the interval leaves the guided prefix unchanged and changes the rest."""
    labels, greedy = torch.tensor([207, 360]), SampleConfig(cfg=4.0, top_k=1, top_p=1.0, temperature=1.0)
    full = generate(tiny, labels, greedy, g_seed=0).tokens[0]
    assert torch.equal(full, _teacher_forced_argmax(tiny, labels, full, 4.0, [True] * 256))
    tiny.cfg_interval = 100
    try:
        part = generate(tiny, labels, greedy, g_seed=0).tokens[0]
    finally:
        tiny.cfg_interval = -1
    assert torch.equal(part, _teacher_forced_argmax(tiny, labels, part, 4.0, cfg_steps(256, 100)))
    assert torch.equal(part[:, :102], full[:, :102]) and not torch.equal(part[:, 102:], full[:, 102:])


def test_engine_and_reference_draw_the_same_tokens(tiny):
    reference = build_llamagen("test", weights="random", vae="random", vae_ch=32, seed=3,
                               engine=EngineConfig.reference())
    sampling = SampleConfig(cfg=2.0, top_k=50, top_p=0.9, temperature=0.9)
    a = generate(tiny, torch.tensor([1, 2]), sampling, g_seed=5)
    b = generate(reference, torch.tensor([1, 2]), sampling, g_seed=5)
    assert torch.equal(a.tokens[0], b.tokens[0]) and a.tokens[0].shape == (2, 256)
    assert tiny.kv_buffer is not None and reference.kv_buffer is None  # the engine keeps its buffer
    assert len(set(a.tokens[0][0].tolist())) > 50  # really sampled, not a constant map
    torch.testing.assert_close(a.images, b.images, atol=1e-4, rtol=0)
    assert a.images.shape == (2, 3, 256, 256) and 0 <= a.images.min() and a.images.max() <= 1


def test_null_rows_only_with_guidance(tiny):
    """The official generate() doubles the batch only when cfg > 1 (and keeps both halves past cfg_interval)."""
    from varbench.harness.core.loop import Variant

    assert isinstance(tiny, Variant)
    for cfg, rows in ((1.0, 2), (1.5, 4)):
        out = generate(tiny, torch.tensor([3, 4]), SampleConfig(cfg=cfg, top_k=1, top_p=1.0), g_seed=0)
        assert tiny.kv_buffer.rows == rows and out.state.guided == (rows == 4)


def _tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_llamagen_net(TEST_CONFIG, seed).state_dict()


def test_released_layouts_load(tmp_path):
    sd = _tiny_state_dict()
    ddp = tmp_path / "ddp.pt"  # train_c2i.py: weights under "model" beside the optimizer, step and args
    torch.save({"model": sd, "optimizer": {"state": {}}, "steps": 7, "args": argparse.Namespace(lr=1e-4)}, ddp)
    fsdp = tmp_path / "fsdp.pt"  # the FSDP files: the bare state dict (here with a stale RoPE table)
    torch.save({**sd, "freqs_cis": torch.zeros(3)}, fsdp)
    for path in (ddp, fsdp):
        net = load_llamagen_net(path, n_head=2)
        assert net.cfg == TEST_CONFIG
        assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())


def test_wrong_files_are_refused_with_the_difference(tmp_path):
    sd = _tiny_state_dict()
    path = tmp_path / "c2i_tiny.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"c2i_tiny\.pt holds LlamaGen \(2 layers.*llamagen_b is GPT-B "
                                              r"\(12 layers, 12 heads, width 768\)"):
        load_llamagen_net(path, expect_size="b", n_head=2)
    vq = tmp_path / "vq.pt"
    torch.save({"model": LlamaGenVQ(VQConfig(ch=32, codebook_size=256)).state_dict()}, vq)
    with pytest.raises(CheckpointError, match=r"vq\.pt is not a LlamaGen GPT state dict: it looks like a LlamaGen VQ"):
        load_llamagen_net(vq, n_head=2)
    del sd["layers.1.ffn_norm.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layers\.1\.ffn_norm\.weight"):
        load_llamagen_net(path, n_head=2)
    with pytest.raises(CheckpointError, match="pass n_head"):
        load_llamagen_net(vq.with_name("c2i_tiny.pt"))


def test_absent_released_file_names_it_and_where_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("VARBENCH_DOWNLOAD", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"c2i_XL_384\.pt.*huggingface\.co/FoundationVision/LlamaGen"):
        create_variant("llamagen_xl")
    with pytest.raises(ValueError, match="no released LlamaGen GPT-XL at 256 px"):
        create_variant("llamagen_xl", image_size=256)


def test_registered_sizes_and_kv_policies():
    assert {f"llamagen_{s}" for s in SIZES} | {"test_llamagen"} <= set(VARIANTS.list("*llamagen*"))
    assert VARIANTS.get("llamagen_3b").has_kv_cache is False
    from varbench.harness.core.registry import KV_POLICIES

    with pytest.raises(ValueError, match="'h2o' cannot apply to LlamaGen.*no KV cache"):
        create_variant("test_llamagen", kv_policy=KV_POLICIES.get("h2o")())
    variant = create_variant("test_llamagen", kv_policy=KV_POLICIES.get("full")())
    assert variant.patch_nums == (16,) and variant.stages() == [("test_llamagen", (0,))]
    assert math.isclose(variant.flops_per_image(), 2 * 2 * 256 * (2 * (4 * 64 * 64 + 3 * 64 * 256 + 2 * 64 * 264)
                                                                  + 64 * 256))
