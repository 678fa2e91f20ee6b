"""The scale accelerations on Infinity (issue 15 item 1): FastVAR with the official Infinity settings
(csguoh/FastVAR@34cdd65 Infinity/infinity/models/fastvar_utils.py, fastvar_basic.py, infinity.py), SkipVAR's
training-free rule (fakerone-li/SkipVAR@607be0e infinity/models/infinity.py) and StageVAR's late stage, each
composing with a KV policy and the engine / reference modes; LiteVAR is refused with the list of those that run.

test_infinity: depth 2, width 64, the 0.06M 1:1 schedule (sides 1 2 4 6 8 12 16, 7 scales). FastVAR's Infinity
layout, from the end: scale 2 (4x4) cached, 6x6 pruned by 0.4 (36 - int(14.4) = 22 kept), 8x8 by 0.5 (64 - 32 =
32 kept), 12x12 and 16x16 skipped. The official block range 3..27 is empty on 2 blocks, so tests name blocks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from varbench.harness.core.kv_cache import CompressedKVCache, ConcatKVCache, StaticKVCache
from varbench.harness.core.loop import generate
from varbench.harness.core.registry import KV_POLICIES, VARIANTS
from varbench.harness.core.sampling import SampleConfig
from varbench.variants.accel import accel_report, apply_acceleration
from varbench.variants.accel.fastvar import _Restore
from varbench.variants.accel.skipvar import SkipVAR
from varbench.variants.engine import EngineConfig
from varbench.variants.infinity_build import build_infinity

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SAMPLING = SampleConfig(cfg=3.0, top_k=900, top_p=0.97, temperature=0.7)
LABELS = torch.tensor([0, 5])
SIDES = (1, 2, 4, 6, 8, 12, 16)
MODES = {"engine": EngineConfig("fp32"), "reference": EngineConfig.reference()}


@pytest.fixture(scope="module")
def plain():
    """test_infinity (engine, fp32) without an acceleration, and its generation over LABELS."""
    v = build_infinity("test", engine=EngineConfig("fp32"))
    return v, generate(v, LABELS, SAMPLING, g_seed=3)


def run(name: str | None, engine: EngineConfig = MODES["engine"], kv_policy=None, **args):
    v = build_infinity("test", engine=engine, kv_policy=kv_policy)
    apply_acceleration(v, name, **args)
    return v, generate(v, LABELS, SAMPLING, g_seed=3)


def same(a, b, scales=range(len(SIDES))) -> bool:
    return all(torch.equal(a.tokens[si], b.tokens[si]) for si in scales)


def skipped(out, si: int) -> bool:
    return bool((out.tokens[si] == -1).all())


# -- FastVAR ------------------------------------------------------------------------------------------
def test_fastvar_takes_the_official_infinity_settings():
    v = build_infinity("test", acceleration="fastvar")
    assert v.acceleration_record == {"acceleration": "fastvar", "accel_unverified": [],
                                     "accel_args": {"ratios": (0.4, 0.5), "skip_last": 2, "which_layers": (3, 28)}}
    mine = build_infinity("test", acceleration="fastvar", acceleration_args={"skip_last": 1})
    assert mine.acceleration.args["skip_last"] == 1  # a given argument wins over the family default


def test_fastvar_prunes_and_skips_the_hand_computed_tokens(plain):
    _, base = plain
    v, out = run("fastvar", which_layers=[0, 2])
    report = accel_report(v, out.state)
    assert report["tokens_per_scale"] == [1, 4, 16, 22, 32, 0, 0]
    assert report["rows_per_scale"] == [4, 4, 4, 4, 4, 0, 0]  # both CFG halves of 2 prompts, nothing when skipped
    assert report["steps_skipped_per_sample"] == [2, 2]
    assert same(out, base, range(3))  # up to the cached scale the network is unchanged
    assert not same(out, base, [3]) and skipped(out, 5) and skipped(out, 6)
    assert isinstance(out.state.cache, StaticKVCache)  # every block prunes: one count per scale
    assert out.state.cache.length == 1 + 4 + 16 + 22 + 32
    assert out.images.shape == (2, 3, 256, 256) and 0 <= float(out.images.min()) <= float(out.images.max()) <= 1


def test_fastvar_unpruned_blocks_keep_every_key():
    """Blocks outside `which_layers` compute and cache all tokens (official: blocks 0-2 and 28-31 of Infinity-2B)."""
    v, out = run("fastvar", which_layers=[1, 2])
    cache = out.state.cache
    assert isinstance(cache, ConcatKVCache)  # two token counts per scale: the static cache cannot hold them
    assert [k.shape[2] for k in cache.k] == [1 + 4 + 16 + 36 + 64, 1 + 4 + 16 + 22 + 32]
    assert accel_report(v, out.state)["tokens_per_scale"] == [1, 4, 16, 22, 32, 0, 0]


@pytest.mark.parametrize("mode", MODES)
def test_fastvar_disabled_gives_plain_infinitys_bits(plain, mode):
    _, base = plain
    _, out = run("fastvar", MODES[mode], ratios=[], skip_last=0)
    assert same(out, base)
    assert torch.allclose(out.images, base.images, atol=1e-5 if mode == "reference" else 0)


def test_fastvar_engine_and_reference_agree():
    _, a = run("fastvar", MODES["engine"], which_layers=[1, 2])
    _, b = run("fastvar", MODES["reference"], which_layers=[1, 2])
    assert same(a, b) and torch.allclose(a.images, b.images, atol=1e-5)


def test_fastvar_with_hidden_state_guidance():
    """cfg_insertion_layer -1 mixes the halves after the last block: the cached scale (run through the plan) and
    those before it draw plain Infinity's bits."""
    v = build_infinity("test", engine=EngineConfig("fp32"), cfg_insertion_layer=-1)
    base = generate(v, LABELS, SAMPLING, g_seed=3)
    apply_acceleration(v, "fastvar", which_layers=[0, 2])
    out = generate(v, LABELS, SAMPLING, g_seed=3)
    assert same(out, base, range(3)) and not same(out, base, [3])
    assert accel_report(v, out.state)["rows_per_scale"] == [4, 4, 4, 4, 4, 0, 0]


def test_kept_tokens_keep_their_own_rope_positions():
    """Keeping all 36 tokens of the 6x6 scale in pivotal order must give the plain blocks' output: each kept token
    is rotated by its own position's angles, as the official code gathers them."""
    v = build_infinity("test", engine=EngineConfig("fp32"))
    net, gen = v.net, torch.Generator().manual_seed(0)
    x = torch.randn(2, 36, 64, generator=gen)
    text = net.encode_text(torch.randn(2, 4, 64, generator=gen), torch.ones(2, 1, 1, 4, dtype=torch.bool))
    begin, end = v.begin_ends[3]
    rope = v._rope[0][begin:end], v._rope[1][begin:end]
    cache = {"grid": (4, 4), **{(layer, kind): torch.zeros(2, 16, 64) for layer in range(2)
                                for kind in ("attn", "ca", "ffn")}}
    order = _Restore(cache, 36, (6, 6), slice(0, 2))
    args = (x, net.modulations(text.cond), net.text_kv(text), text.mask, rope)
    whole, kept = net.run_blocks(*args), net.run_blocks(*args, plan=order)
    torch.testing.assert_close(kept, whole, atol=1e-5, rtol=1e-5)
    shuffled = x.sub(x.mean(1, keepdim=True)).pow(2).sum(-1).argsort(1, descending=True)
    assert not torch.equal(shuffled, torch.arange(36).expand(2, -1))  # the pivotal order is a real permutation


def test_fastvar_composes_with_kv_policies():
    _, alone = run("fastvar", which_layers=[1, 2])
    _, full = run("fastvar", kv_policy=KV_POLICIES.get("full")(), which_layers=[1, 2])
    assert same(full, alone)
    v, snap = run("fastvar", kv_policy=KV_POLICIES.get("snapkv")(budget=0.1), which_layers=[1, 2])
    assert isinstance(snap.state.cache, CompressedKVCache)
    assert accel_report(v, snap.state)["tokens_per_scale"] == [1, 4, 16, 22, 32, 0, 0]
    assert max(max(layer) for layer in snap.state.cache.lengths()) <= 52  # round(0.1 · 521) per layer and head
    assert skipped(snap, 6) and not skipped(snap, 4)


# -- SkipVAR ------------------------------------------------------------------------------------------
def test_skipvar_decides_where_the_official_code_does():
    assert SkipVAR()._decision_step(SimpleNamespace(patch_nums=(0,) * 13)) == 9  # `if si == 9` of 13 scales
    v = build_infinity("test", acceleration="skipvar")
    assert v.acceleration_record["accel_unverified"] == ["skip_threshold", "skip_steps", "uncond_threshold",
                                                         "uncond_steps"]
    probe = v.probe_image(torch.zeros(2, 16, 1, 16, 16), 8)  # f̂ resized to scale 4's 8x8 grid, decoded
    assert probe.shape == (2, 3, 128, 128)


@pytest.mark.parametrize("mode", MODES)
def test_skipvar_disabled_gives_plain_infinitys_bits(plain, mode):
    _, base = plain
    _, out = run("skipvar", MODES[mode], skip_threshold=0, uncond_threshold=0)
    assert same(out, base)


def test_skipvar_skips_and_drops_the_unconditional_branch(plain):
    _, base = plain
    v, out = run("skipvar", skip_threshold=1e9, skip_steps=2)  # every sample converged: skip the last 2 steps
    report = accel_report(v, out.state)
    assert report["steps_skipped_per_sample"] == [2, 2] and report["rows_per_scale"][5:] == [0, 0]
    assert same(out, base, range(5)) and skipped(out, 5) and skipped(out, 6)
    v, out = run("skipvar", skip_threshold=0, uncond_threshold=1e9, uncond_steps=2)
    assert accel_report(v, out.state)["rows_per_scale"] == [4, 4, 4, 4, 4, 2, 2]  # conditional rows only
    assert same(out, base, range(5)) and not same(out, base, [5])


def test_skipvar_decides_per_sample(plain):
    v, out = run("skipvar", skip_threshold=0, uncond_threshold=0)
    diff = accel_report(v, out.state)["diff_hf"]
    assert diff[0] != diff[1]
    v, out = run("skipvar", skip_threshold=sum(diff) / 2, skip_steps=1, uncond_threshold=0)
    converged = min(range(2), key=diff.__getitem__)
    report = accel_report(v, out.state)
    assert report["steps_skipped_per_sample"] == [int(b == converged) for b in range(2)]
    assert bool((out.tokens[6][converged] == -1).all()) and bool((out.tokens[6][1 - converged] >= 0).all())


def test_skipvar_drops_a_half_under_a_compressing_policy(plain):
    v, out = run("skipvar", kv_policy=KV_POLICIES.get("snapkv")(budget=0.1), skip_threshold=0,
                 uncond_threshold=1e9, uncond_steps=2)
    assert accel_report(v, out.state)["rows_per_scale"] == [4, 4, 4, 4, 4, 2, 2]
    assert out.state.cache.batch == 2  # the cache narrowed to the conditional rows


# -- StageVAR -----------------------------------------------------------------------------------------
def test_stagevar_late_stage_on_infinity(plain):
    _, base = plain
    v, out = run("stagevar")
    report = accel_report(v, out.state)
    # last 3 scales, null-prompt rows only, grids of round(n·√0.5) per side: 6, 8, 11
    assert report["tokens_per_scale"] == [1, 4, 16, 36, 36, 64, 121]
    assert report["rows_per_scale"] == [4, 4, 4, 4, 2, 2, 2]
    assert same(out, base, range(4)) and not same(out, base, [4])
    _, off = run("stagevar", late_steps=0)
    assert same(off, base)


# -- refusals and registration ------------------------------------------------------------------------
def test_litevar_is_refused_naming_the_methods_that_run():
    v = build_infinity("test")
    with pytest.raises(ValueError, match="litevar.*infinity.*fastvar, skipvar, stagevar"):
        apply_acceleration(v, "litevar")
    with pytest.raises(ValueError, match="every block prunes"):  # VAR's static cache: one count per scale
        apply_acceleration(VARIANTS.get("test_var")(), "fastvar", which_layers=[1, 2])


def test_infinity_models_take_scale_accelerations():
    for name in ("infinity_2b", "infinity_8b", "test_infinity"):
        factory = VARIANTS.get(name)
        assert factory.accelerates == "scale" and factory.accel_family == "infinity"
