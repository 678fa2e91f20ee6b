"""Infinity: released architectures (exact parameter counts and keys), schedules and RoPE positions, the bitwise
sampler on hand-computed cases, checkpoint refusals, and the test model through the one loop (engine vs reference,
per-scale cfg, hidden-state guidance, negative prompts, aspect ratios)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from varbench.harness.core.checkpoints import CheckpointError
from varbench.harness.core.loop import generate
from varbench.harness.core.registry import VARIANTS
from varbench.harness.core.sampling import SampleConfig, ScaleSampling
from varbench.harness.core.sampling_bitwise import sample_bits
from varbench.variants.bsq_vae import BSQVAE, BSQVAEConfig
from varbench.variants.engine import EngineConfig
from varbench.variants.infinity import Infinity
from varbench.variants.infinity_build import INFINITY_MODELS, build_infinity, random_prompts
from varbench.variants.infinity_loading import (
    infinity_params,
    load_bsq_vae,
    load_infinity_net,
    random_bsq_vae,
    random_infinity_net,
)
from varbench.variants.infinity_model import InfinityConfig, InfinityNet
from varbench.variants.infinity_schedule import (
    TEMPLATES,
    rope_positions,
    scale_schedule,
    template_for,
)

from conftest import CONFORMANCE, KEYS, need

pytestmark = pytest.mark.usefixtures("one_thread")


def _keys(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of a released file, from docs/keys (the official definitions on the meta device)."""
    out = {}
    for line in need(KEYS / f"keys_{name}.txt").read_text().splitlines():
        if not line.startswith("#"):
            key, shape, _, _ = line.split("\t")
            out[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    return out


@pytest.mark.parametrize("name, model, params", [("infinity_2b_reg", "2b", 2_204_564_032),
                                                  ("infinity_8b", "8b", 8_375_791_824)])
def test_released_transformers_have_the_official_keys_and_parameter_counts(name, model, params):
    keys = _keys(name)
    meta_sd = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    cfg = InfinityConfig.from_state_dict(meta_sd)
    assert cfg == INFINITY_MODELS[model][0]  # the registered architecture is the one the keys describe
    with torch.device("meta"):
        sd = InfinityNet(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == keys
    assert infinity_params(cfg) == params


@pytest.mark.parametrize("name, model, params", [("vae_d32", "2b", 110_118_051), ("vae_d56", "8b", 81_624_209)])
def test_released_vaes_have_the_official_keys_and_parameter_counts(name, model, params):
    keys = _keys(name)
    cfg = BSQVAEConfig.from_state_dict({k: torch.empty(s, device="meta") for k, s in keys.items()})
    assert cfg == INFINITY_MODELS[model][1]
    with torch.device("meta"):
        vae = BSQVAE(cfg)
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == keys
    assert sum(p.numel() for p in vae.parameters()) == params


def test_schedules_follow_the_templates():
    assert sum(h * w for h, w in scale_schedule(1.0, "0.06M")) == 521
    assert sum(h * w for h, w in scale_schedule(1.0, "1M")) == 10521
    assert [len(scale_schedule(1.0, pn)) for pn in ("0.06M", "0.25M", "0.60M", "1M")] == [7, 10, 12, 13]
    assert scale_schedule(0.5, "1M")[-1] == (45, 90) and scale_schedule(2.0, "1M")[-1] == (90, 45)
    assert len(TEMPLATES) == 15 and template_for(0.52) == 0.5 and template_for(1.1) == 1.0
    with pytest.raises(ValueError, match="pn"):
        scale_schedule(1.0, "2M")


def test_rope_positions_of_every_template_match_the_official_table():
    table = torch.load(need(CONFORMANCE / "infinity_tiny" / "rope_positions.pt"), weights_only=True)
    for template, want in table["positions"].items():
        assert torch.equal(rope_positions(TEMPLATES[float(template)], float(template)), want.long()), template
    # star mode: positions follow the 1M final grid whatever pn is (1:1 scale 2 is 4x4 on a 64x64 grid)
    assert rope_positions(scale_schedule(1.0, "0.06M"))[5:9].tolist() == [[0, 0], [0, 16], [0, 32], [0, 48]]


# -- the bitwise sampler ---------------------------------------------------------------------------------------

def _pairs(*rows: tuple[float, float]) -> torch.Tensor:
    return torch.tensor([[list(sum(rows, ()))]])  # (1, 1, 2d): one token of d = len(rows) bits


def test_top_k_1_is_a_per_bit_argmax():
    draw = sample_bits(_pairs((0.0, 1.0), (2.0, -1.0), (0.3, 0.2)), False, 1.0, ScaleSampling(top_k=1), None)
    assert draw.tokens.tolist() == [[[1, 0, 0]]]


def test_top_p_drops_the_minority_bit_at_most_1_minus_p():
    # p(bit=1) = sigmoid(3) = 0.9526: with top_p 0.97 the minority (0.047 <= 0.03? no) stays; with 0.9 it goes
    logits = _pairs((0.0, 3.0))
    kept = sample_bits(logits.clone(), False, 1.0, ScaleSampling(top_p=0.97), torch.Generator().manual_seed(0))
    assert torch.isfinite(kept.logits).all()
    cut = sample_bits(logits.clone(), False, 1.0, ScaleSampling(top_p=0.9), torch.Generator().manual_seed(0))
    assert cut.logits[0, 0, 0] == -math.inf and cut.tokens.item() == 1


def test_tau_divides_before_guidance_and_the_draw_is_argmax_p_over_exp_noise():
    cond, uncond = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[0.5, -0.5]]])
    cfg, tau = 3.0, 0.5
    draw = sample_bits(torch.cat((cond, uncond)), True, cfg, ScaleSampling(temperature=tau),
                       torch.Generator().manual_seed(7))
    want = cfg * cond / tau + (1 - cfg) * uncond / tau  # = [-2, 8]
    assert torch.allclose(draw.logits, want.view(1, 1, 2))
    noise = torch.empty(1, 2).exponential_(1, generator=torch.Generator().manual_seed(7))
    assert draw.tokens.item() == int((want.view(1, 2).softmax(-1) / noise).argmax())


def test_per_scale_cfg_is_validated_against_the_schedule():
    with pytest.raises(ValueError, match="cfg has 2 values"):
        SampleConfig(cfg=(1.0, 2.0)).validate(7)
    assert SampleConfig(cfg=[1, 2, 3]).cfg_at(2) == 3.0


# -- checkpoints -----------------------------------------------------------------------------------------------

def test_a_var_checkpoint_or_another_size_is_refused_naming_file_and_difference(tmp_path):
    from varbench.variants.var_model import VARConfig, VARNet

    var_file = tmp_path / "var.pth"
    torch.save(VARNet(VARConfig(depth=2)).state_dict(), var_file)
    with pytest.raises(CheckpointError, match=r"var\.pth is not an Infinity .*VAR state dict"):
        load_infinity_net(var_file)
    small = tmp_path / "small.pth"
    torch.save(random_infinity_net(INFINITY_MODELS["test"][0]).state_dict(), small)
    with pytest.raises(CheckpointError, match=r"small\.pth holds an Infinity of depth 2.*infinity_2b.*depth 2 "
                                              r"\(want 32\)"):
        load_infinity_net(small, INFINITY_MODELS["2b"][0], "infinity_2b")
    with pytest.raises(CheckpointError, match="not a BSQ VAE"):
        load_bsq_vae(small)


def test_released_models_name_the_missing_files(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("VARBENCH_DOWNLOAD", "0")
    with pytest.raises(CheckpointError, match="infinity_2b_reg.pth"):
        VARIANTS.get("infinity_2b")()
    with pytest.raises(CheckpointError, match="infinity_8b_weights"):
        VARIANTS.get("infinity_8b")()


# -- the test model through the loop -----------------------------------------------------------------------------

SAMPLING = SampleConfig(cfg=(1.0, 1.5, 2.0, 3.0, 3.0, 3.0, 3.0), top_k=900, top_p=0.97, temperature=0.7)


def test_engine_and_reference_draw_the_same_bits():
    engine = build_infinity("test", engine=EngineConfig("fp32"))
    reference = build_infinity("test", engine=EngineConfig.reference())
    a = generate(engine, torch.tensor([0, 5]), SAMPLING, g_seed=3)
    b = generate(reference, torch.tensor([0, 5]), SAMPLING, g_seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))
    assert [t.shape for t in a.tokens] == [(2, h * w) for h, w in engine.schedule]
    assert torch.allclose(a.images, b.images, atol=1e-5) and a.images.shape == (2, 3, 256, 256)
    assert a.state.kv_bytes[-1] == 2 * 2 * 4 * 521 * 64 * 4  # K and V, 2 layers, 2B rows, 521 tokens, width 64, fp32


def test_hidden_state_guidance_mixes_after_the_chosen_block():
    labels = torch.tensor([1, 2])
    sampling = SampleConfig(cfg=3.0, top_k=900, top_p=0.0)
    last = build_infinity("test", cfg_insertion_layer=-1)
    state = last.start(labels, sampling)
    x = state.x + last.net.lvl_embed.weight[0]
    rope = last._rope[0][:1], last._rope[1][:1]
    with torch.inference_mode():
        h = last.net.run_blocks(x, state.mods, state.text_kv, state.text.mask, rope)  # no cache: scale 0 only
        out = last.forward(state, last.steps()[0])
        head = state.head_mod[0][:2], state.head_mod[1][:2]
    assert not out.guided
    assert torch.allclose(out.logits, last.net.logits(3.0 * h[:2] - 2.0 * h[2:], head), atol=1e-5)
    # depth 3, k = -2: mixed after block 1, so only block 2's cache differs from guidance on the logits
    arch, vae_arch = replace(INFINITY_MODELS["test"][0], depth=3, chunks=1), INFINITY_MODELS["test"][1]
    net, vae = random_infinity_net(arch), random_bsq_vae(vae_arch)
    caches = []
    for layer in (-2, 0):
        deeper = Infinity(net, vae, prompts=random_prompts(64), pn="0.06M", cfg_insertion_layer=layer)
        state = deeper.start(labels, sampling)
        with torch.inference_mode():
            deeper.forward(state, deeper.steps()[0])
        caches.append(state.cache.k[:, :, :, :1].clone())  # (layers, 2B, H, 1, c)
    assert torch.equal(caches[0][:2], caches[1][:2]) and not torch.allclose(caches[0][2], caches[1][2])
    with pytest.raises(ValueError, match="cfg_insertion_layer = -3"):
        Infinity(deeper.net, deeper.vae, cfg_insertion_layer=-3)


def test_negative_prompt_replaces_the_unconditional_text_only_when_guided():
    negative = 0.25 * torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    plain, neg = build_infinity("test"), build_infinity("test", negative=negative)
    guided = [generate(v, torch.tensor([2]), SAMPLING, g_seed=0).tokens for v in (plain, neg)]
    assert any(not torch.equal(a, b) for a, b in zip(*guided))
    unguided = SampleConfig(cfg=1.0, top_k=900, top_p=0.97)
    same = [generate(v, torch.tensor([2]), unguided, g_seed=0).tokens for v in (plain, neg)]
    assert all(torch.equal(a, b) for a, b in zip(*same))
    assert neg.start(torch.tensor([2]), unguided).text.cond.shape[0] == 1  # cfg 1 everywhere: no second half


def test_other_aspect_ratios_generate_their_template_size():
    wide = build_infinity("test", h_div_w=0.5)
    out = generate(wide, torch.tensor([0]), SAMPLING, g_seed=0)
    assert wide.schedule[-1] == (11, 22) and out.images.shape == (1, 3, 176, 352)
    assert [t.shape[1] for t in out.tokens] == [h * w for h, w in scale_schedule(0.5, "0.06M")]


def test_missing_prompts_and_bad_guidance_layers_are_named():
    bare = build_infinity("test", prompts=None)
    bare.prompts = []
    with pytest.raises(ValueError, match="no prompts"):
        generate(bare, torch.tensor([0]), SAMPLING)
    with pytest.raises(ValueError, match="cfg_insertion_layer = 1"):
        build_infinity("test", cfg_insertion_layer=1)


def test_patchify_puts_each_2x2_latent_patch_in_one_token():
    from varbench.variants.bsq_vae import patchify, unpatchify

    f = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 1, 4, 6)  # (B, d, 1, H, W)
    tokens = patchify(f, 2)  # (B, 2·3, 4·d)
    b, c, y, x, i, j = 1, 2, 1, 2, 1, 0
    assert tokens.shape == (2, 6, 12) and tokens[b, y * 3 + x, c * 4 + 2 * i + j] == f[b, c, 0, 2 * y + i, 2 * x + j]
    assert torch.equal(unpatchify(tokens.view(2, 2, 3, 12), 2), f)


def test_a_patchify_model_generates_through_the_loop():
    # the 8B's layout at toy size: 16 bits per token = 2x2 latent patches of a 4-bit, stride-8 VAE
    arch = replace(INFINITY_MODELS["test"][0], bits=16)
    vae_arch = BSQVAEConfig(codebook_dim=4, patch_size=8, ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    variant = Infinity(random_infinity_net(arch), random_bsq_vae(vae_arch), prompts=random_prompts(64), pn="0.06M")
    out = generate(variant, torch.tensor([0]), SAMPLING, g_seed=0)
    assert variant.patch == 2 and out.state.f_hat.shape == (1, 4, 1, 32, 32)
    assert out.images.shape == (1, 3, 256, 256) and torch.isfinite(out.images).all()


def test_sharded_weights_and_plain_vae_names_load_strictly(tmp_path):
    import json

    net = random_infinity_net(INFINITY_MODELS["test"][0], seed=3)
    sd = net.state_dict()
    keys = list(sd)
    shards = {"model-1.pth": keys[: len(keys) // 2], "model-2.pth": keys[len(keys) // 2:]}  # the 8B's layout
    for shard, names in shards.items():
        torch.save({k: sd[k] for k in names}, tmp_path / shard)
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (tmp_path / "model.pth.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_infinity_net(tmp_path, INFINITY_MODELS["test"][0])
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    # plain conv/norm names and a single quantizer key, as the official load_cnn also accepts
    vae = random_bsq_vae(INFINITY_MODELS["test"][1], seed=4)
    def unwrapped(key: str) -> str:  # drop the wrapper level: encoder.conv_in.conv.weight -> encoder.conv_in.weight
        for wrapper in (".conv.", ".norm."):
            at = key.rfind(wrapper)
            if at >= 0 and key.count(".", at + 1) == 1:
                return key[:at] + key[at + len(wrapper) - 1:]
        return key

    plain = {unwrapped(k): v for k, v in vae.state_dict().items() if not k.startswith("quantize.")}
    assert "encoder.down.0.downsample.conv.weight" in plain and "encoder.norm_out.weight" in plain
    torch.save({"vae": plain}, tmp_path / "vae.pth")
    again = load_bsq_vae(tmp_path / "vae.pth")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in vae.state_dict().items())
