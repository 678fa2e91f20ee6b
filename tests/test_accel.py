"""Training-free accelerations (variants/accel/): registry and argument checks, each method's defining behaviour on
the tiny random VAR, and the settings that disable a method giving plain VAR's tokens exactly."""

from __future__ import annotations

import pytest
import torch

from varbench.harness.core.kv_cache import StaticKVCache, attention
from varbench.harness.core.loop import generate
from varbench.harness.core.registry import create_variant
from varbench.harness.core.sampling import SampleConfig
from varbench.variants.accel import ACCELERATIONS, accel_report, apply_acceleration
from varbench.variants.accel.base import area_resize
from varbench.variants.accel.fastvar import _Restore, pivotal_tokens
from varbench.variants.accel.litevar import _Attend, window_mask
from varbench.variants.accel.skipvar import high_freq_features
from varbench.variants.accel.stagevar import _LowRank, grid_representatives

LABELS = torch.tensor([1, 2, 3])
SAMPLING = SampleConfig()  # cfg 1.5, top-k 900, top-p 0.96
SCHEDULE = (1, 2, 3, 4, 5, 6, 8)  # the zoo's 7 scales keep the tiny model fast
S = len(SCHEDULE)


@pytest.fixture(scope="module")
def model(one_thread):
    return create_variant("test_var", patch_nums=SCHEDULE)


def run(model, acceleration: str | None = None, **args):
    """One call of the shared tiny model with an acceleration (None: plain VAR)."""
    apply_acceleration(model, acceleration, **args)
    out = generate(model, LABELS, SAMPLING, g_seed=0)
    return model, out, accel_report(model, out.state)


@pytest.fixture(scope="module")
def plain(model):
    return run(model)[1]


def same_scales(a, b) -> list[bool]:
    return [torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)]


# -- registry and arguments -------------------------------------------------------------------------
def test_registry_lists_the_scale_and_raster_methods_and_none():
    assert ACCELERATIONS.list() == ["fastvar", "lantern", "litevar", "none", "sjd", "skipvar", "stagevar", "zipar"]
    for name in ACCELERATIONS.list():
        assert "arXiv" in ACCELERATIONS.get(name).__doc__ or name == "none"


@pytest.mark.parametrize("name, args, message", [
    ("fastvar", {"ratio": 0.3}, "has no argument.*'ratio'; valid: ratios, skip_last"),
    ("fastvar", {"ratios": [1.0]}, "prunes every token"),
    ("skipvar", {"skip_steps": -1}, "skip_steps must be an integer >= 0"),
    ("stagevar", {"branch": "null"}, "branch must be uncond, cond or both"),
    ("litevar", {"window": 2}, r"window must be a number in \[0, 1\]"),
])
def test_bad_arguments_are_named_with_the_valid_ones(name, args, message):
    with pytest.raises(ValueError, match=message):
        ACCELERATIONS.get(name)(**args)


def test_the_factory_takes_an_acceleration_and_refuses_settings_that_do_not_fit_the_schedule(model):
    variant = create_variant("test_var", patch_nums=SCHEDULE, acceleration="fastvar",
                             acceleration_args={"ratios": [0.25]})
    assert variant.acceleration.args == {"ratios": (0.25,), "skip_last": 0}
    assert variant.acceleration_record["accel_unverified"] == ["ratios", "skip_last"]
    with pytest.raises(ValueError, match="leave no cached scale"):
        apply_acceleration(model, "fastvar", ratios=[0.5] * S)
    with pytest.raises(ValueError, match="only 3 steps follow the decision step"):
        apply_acceleration(model, "skipvar", skip_steps=4)
    with pytest.raises(ValueError, match="HMAR runs its own masked steps"):
        apply_acceleration(create_variant("test_hmar"), "fastvar")


@pytest.mark.parametrize("name, args", [
    ("none", {}), ("fastvar", {"ratios": []}), ("skipvar", {"skip_threshold": 0, "uncond_threshold": 0}),
    ("stagevar", {"late_steps": 0}), ("stagevar", {"rank_ratio": 1.0, "branch": "both"}),
    ("litevar", {"window": 0, "share_cfg": False}),
])
def test_a_disabled_method_gives_plain_var_tokens(model, plain, name, args):
    _, out, _ = run(model, name, **args)
    assert all(same_scales(out, plain))
    assert torch.equal(out.images, plain.images)


# -- FastVAR ----------------------------------------------------------------------------------------
def test_pivotal_tokens_are_the_farthest_from_the_mean():
    x = torch.zeros(1, 4, 2)
    x[0, 2] = torch.tensor([3.0, 0.0])  # far from the mean (0.75, 0)
    x[0, 0] = torch.tensor([0.0, 1.0])
    assert pivotal_tokens(x, 2).tolist() == [[2, 0]]


def test_pruned_positions_take_the_area_resized_cached_update():
    cached = torch.arange(4.0).view(1, 4, 1)  # a 2x2 map's update
    plan = _Restore({(0, "ffn"): cached}, keep=1, side=4, rows=slice(None))
    x = torch.zeros(1, 16, 1)
    x[0, 5] = 9.0  # the one pivotal token
    out = plan.sublayer(0, "ffn", x, lambda h: h + 100.0)
    expected = area_resize(cached, 4)  # nearest-block copy of the 2x2 map
    expected[0, 5] = 109.0
    assert torch.equal(out, expected)


def test_fastvar_prunes_the_last_two_scales_and_keeps_the_earlier_ones_exact(model, plain):
    variant, out, report = run(model, "fastvar")
    kept = [36 - int(36 * 0.4), 64 - int(64 * 0.5)]  # 22, 32
    assert report["tokens_per_scale"] == [1, 4, 9, 16, 25, *kept]
    assert report["rows_per_scale"] == [6] * S
    assert same_scales(out, plain) == [True] * 5 + [False] * 2
    assert variant.kv_buffer.length == 155 - (36 - kept[0]) - (64 - kept[1])  # pruned tokens never cached


def test_fastvar_skip_last_skips_the_final_steps(model, plain):
    _, out, report = run(model, "fastvar", ratios=[0.5], skip_last=1)
    assert report["tokens_per_scale"][-3:] == [25, 36 - 18, 0]
    assert report["steps_skipped_per_sample"] == [1, 1, 1]
    assert (out.tokens[-1] == -1).all()
    assert len(out.state.kv_bytes) == S and out.state.kv_bytes_current[-1] == 0  # nothing cached at the skipped step


# -- SkipVAR ----------------------------------------------------------------------------------------
def test_high_frequency_features_closed_forms():
    flat, checker = torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    checker[..., ::2, :] = 0.0  # rows of 0 and 1: DC and the row Nyquist frequency, 32 each
    diff, ratio = high_freq_features(flat, flat)
    assert diff.tolist() == [0.0, 0.0] and ratio.tolist() == [0.0, 0.0]  # a constant image is all DC
    _, ratio = high_freq_features(checker, flat)
    assert ratio[0].item() == pytest.approx(0.5, abs=1e-6)  # DC and the Nyquist row frequency share the energy


def test_skipvar_skips_late_steps_per_sample(model, plain):
    diffs = run(model, "skipvar", skip_threshold=0, uncond_threshold=0)[2]["diff_hf"]
    threshold = sorted(diffs)[1] + 1e-6  # the two samples that changed least skip
    _, out, report = run(model, "skipvar", skip_threshold=threshold, uncond_threshold=0, skip_steps=2)
    skipping = torch.tensor([d < threshold for d in diffs])
    assert report["skip_steps"] == [2 * int(s) for s in skipping]
    assert report["steps_skipped_per_sample"] == [2 * int(s) for s in skipping]
    assert same_scales(out, plain)[:5] == [True] * 5
    for si in (5, 6):  # the batch still runs the step; skipping samples keep their latent and draw nothing
        assert (out.tokens[si][skipping] == -1).all()
        assert torch.equal(out.tokens[si][~skipping], plain.tokens[si][~skipping])
    with torch.inference_mode():
        f_hat = torch.zeros_like(out.state.f_hat)
        for si, pn in enumerate(SCHEDULE[:5]):
            model.vae.next_input(si, SCHEDULE, f_hat, model.vae.embed(plain.tokens[si], pn))
    assert torch.allclose(out.state.f_hat[skipping], f_hat[skipping], atol=1e-5)


def test_skipvar_drops_the_unconditional_branch(model, plain):
    _, out, report = run(model, "skipvar", skip_threshold=0, uncond_threshold=10.0, uncond_steps=2)
    assert report["rows_per_scale"] == [6] * 5 + [3, 3]  # the conditional rows alone
    assert report["uncond_steps"] == [2, 2, 2] and report["steps_skipped_mean"] == 0.0
    assert same_scales(out, plain) == [True] * 5 + [False] * 2


# -- StageVAR ---------------------------------------------------------------------------------------
def test_grid_representatives():
    assert grid_representatives(4, 0.25, torch.device("cpu")).tolist() == [5, 7, 13, 15]
    assert len(grid_representatives(13, 0.5, torch.device("cpu"))) == 81


def test_low_rank_restoration_copies_the_most_similar_representative():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]])
    plan = _LowRank(torch.tensor([0, 1]), torch.eye(2))
    out = plan.sublayer(0, "attn", x, lambda h: h * 10)
    assert torch.equal(out, torch.tensor([[[10.0, 0.0], [0.0, 10.0], [10.0, 0.0], [0.0, 10.0]]]))


def test_stagevar_runs_one_branch_on_representatives_in_the_late_stage(model, plain):
    _, out, report = run(model, "stagevar")
    assert report["rows_per_scale"] == [6] * 5 + [3, 3]
    assert report["tokens_per_scale"][-2:] == [4 * 4, 6 * 6]  # round(6·√0.5) = 4, round(8·√0.5) = 6
    assert same_scales(out, plain) == [True] * 5 + [False] * 2


# -- LiteVAR ----------------------------------------------------------------------------------------
def test_window_mask_is_the_official_scaled_diagonal_band_past_the_global_scales():
    # window 0.5: key scale 1 (4 keys) gets w = round(2) = 2, scale 2 (9 keys) w = round(4.5) = 4
    mask = window_mask((1, 2, 3), 2, window=0.5, global_scales=1, device=torch.device("cpu"))
    assert mask.shape == (9, 14)
    assert mask[:, 0].all()  # scale 0 is global
    assert mask[0, 1:5].tolist() == [True, True, False, False]  # |0·4/9 - j| < 2
    assert mask[8, 1:5].tolist() == [False, False, True, True]  # 8·4/9 = 3.56: |3.56 - j| < 2 for j = 2, 3
    assert mask[4, 5:].tolist() == [False] + [True] * 7 + [False]  # own scale: |4 - j| < 4


def test_masked_scores_become_zero_and_stay_in_the_softmax():
    # LiteVAR@176ee6a mask_inference multiplies the scores by the 0/1 mask: a masked key keeps weight exp(0)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    visible = torch.tensor([[True, False, True], [False, True, True]])
    cache = StaticKVCache(1, 2, 1, 3, 4, torch.float32, "cpu")
    out = _Attend(None, share=False, visible=visible).attend(0, q, k, v, None, cache)
    scores = q @ k.transpose(-1, -2)
    want = torch.where(visible, scores, torch.zeros(())).softmax(-1) @ v
    assert torch.allclose(out, want, atol=1e-6)
    excluded = scores.masked_fill(~visible, -torch.inf).softmax(-1) @ v
    assert (out - excluded).abs().max() > 1e-2  # not the -inf exclusion


def test_shared_cfg_attention_applies_the_conditional_scores_to_each_half():
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 2, 3, 8), torch.randn(4, 2, 3, 8), torch.randn(4, 2, 3, 8)
    cache = StaticKVCache(1, 4, 2, 3, 8, torch.float32, "cpu")
    out = _Attend(None, share=True).attend(0, q, k, v, None, cache)
    probs = (q[:2] @ k[:2].transpose(-1, -2)).softmax(-1)
    assert torch.allclose(out, torch.cat((probs @ v[:2], probs @ v[2:])), atol=1e-6)
    assert torch.allclose(out[:2], attention(q[:2], k[:2], v[:2]), atol=1e-6)  # the conditional half is exact


def test_litevar_windows_late_scales_and_records_the_kept_attention(model, plain):
    _, out, report = run(model, "litevar", share_cfg=False)
    kept = report["attention_kept_per_scale"]
    assert kept[:3] == [1.0, 1.0, 1.0] and all(0 < k < 1 for k in kept[3:])
    n, sizes = 16, [1, 4, 9, 16]  # scale 3: keys of scales 0, 1 whole, bands of w = 2 and 4 over scales 2, 3
    band = window_mask((1, 2, 3, 4), 3, 0.25, 2, torch.device("cpu"))
    assert kept[3] == round(float(band.float().mean()), 4) and band.shape == (n, sum(sizes))
    # hand count: scale 2 keeps the j with |9i/16 - j| < 2: 2, 3, 4 x 11, 3, 3, 2 keys for i = 0..15 (57 in all);
    # scale 3 keeps |i - j| < 4: 16 + 2·(15 + 14 + 13) = 100
    assert int(band.sum()) == n * 5 + 57 + 100
    assert same_scales(out, plain)[:3] == [True] * 3
