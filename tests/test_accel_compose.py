"""Accelerations composed with the rest: a KV policy, CoDe (drafter/refiner), the reference engine (the official
code's concatenated cache), and a speed sanity run on the zoo (printed, never asserted)."""

from __future__ import annotations

import time

import pytest
import torch

from varbench.harness.core.loop import generate
from varbench.harness.core.registry import KV_POLICIES, create_variant
from varbench.harness.core.sampling import SampleConfig
from varbench.variants.accel import accel_report, apply_acceleration
from varbench.variants.engine import EngineConfig

LABELS = torch.tensor([1, 2, 3])
SAMPLING = SampleConfig()
SCHEDULE = (1, 2, 3, 4, 5, 6, 8)


def tokens_of(variant, name=None, **args):
    apply_acceleration(variant, name, **args)
    out = generate(variant, LABELS, SAMPLING, g_seed=0)
    return out, accel_report(variant, out.state)


def same(a, b) -> list[bool]:
    return [torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)]


@pytest.fixture(scope="module")
def with_policy(one_thread):
    """A model with H2O keeping half its cache, and its plain tokens."""
    variant = create_variant("test_var", patch_nums=SCHEDULE, kv_policy=KV_POLICIES.get("h2o")(budget=0.5))
    return variant, tokens_of(variant)[0]


def test_a_disabled_acceleration_keeps_the_kv_policys_tokens(with_policy):
    variant, alone = with_policy
    disabled, _ = tokens_of(variant, "fastvar", ratios=[])
    assert all(same(disabled, alone))


@pytest.mark.parametrize("name, args, late", [("fastvar", {}, [22, 32]), ("stagevar", {}, [16, 36]),
                                              ("skipvar", {"skip_threshold": 0, "uncond_threshold": 10.0}, [36, 64])])
def test_accelerations_compose_with_a_compressing_kv_policy(with_policy, name, args, late):
    variant, alone = with_policy
    out, report = tokens_of(variant, name, **args)
    assert same(out, alone)[:5] == [True] * 5  # the policy evicts as before up to the accelerated scales
    assert report["tokens_per_scale"][-2:] == late


def test_litevar_under_an_evicting_policy_bands_the_scales_own_keys_only(one_thread):
    variant = create_variant("test_var", patch_nums=SCHEDULE, kv_policy=KV_POLICIES.get("streaming")(budget=0.5))
    alone, _ = tokens_of(variant)
    out, report = tokens_of(variant, "litevar")
    assert report["share_cfg_active"] is False  # evicted keys have no position: each CFG half keeps its scores
    band = (torch.arange(16).view(-1, 1) - torch.arange(16).view(1, -1)).abs() <= 4  # scale 3: 4x4, w = 4
    assert report["attention_kept_per_scale"][3] == round(float(band.float().mean()), 4)
    assert same(out, alone)[:3] == [True] * 3


@pytest.fixture(scope="module")
def engine_and_reference(one_thread):
    return (create_variant("test_var", patch_nums=SCHEDULE),
            create_variant("test_var", patch_nums=SCHEDULE, engine=EngineConfig.reference()))


@pytest.mark.parametrize("name", ["fastvar", "stagevar", "litevar", "skipvar"])
def test_the_reference_engine_gives_the_engine_tokens(engine_and_reference, name):
    args = {"skip_threshold": 1e9} if name == "skipvar" else {}
    engine, reference = engine_and_reference
    a, report_a = tokens_of(engine, name, **args)
    b, report_b = tokens_of(reference, name, **args)
    assert all(same(a, b))
    features = ("diff_hf", "hf_ratio")  # read off decoded images: the engine's channels-last decode rounds apart
    assert {k: v for k, v in report_a.items() if k not in features} == \
        {k: v for k, v in report_b.items() if k not in features}
    for key in set(features) & set(report_a):
        assert report_a[key] == pytest.approx(report_b[key], rel=1e-4)


@pytest.fixture(scope="module")
def code(one_thread):
    return create_variant("test_code", draft_steps=7)  # drafter: scales 0..6; refiner: prefill 7, then 8, 9


@pytest.fixture(scope="module")
def code_plain(code):
    return tokens_of(code)[0]


def test_code_disabled_acceleration_gives_plain_code_tokens(code, code_plain):
    plain = code_plain
    for name, args in [("fastvar", {"ratios": []})]:
        out, _ = tokens_of(code, name, **args)
        assert all(same(out, plain))


def test_skipvar_decides_while_drafting_and_the_refiner_skips(code, code_plain):
    plain = code_plain
    out, report = tokens_of(code, "skipvar", skip_threshold=1e9, skip_steps=2)  # decided after scale 6 (drafter)
    assert code.refiner.joins_acceleration and out.state.refiner.accel is out.state.drafter.accel
    assert report["skip_steps"] == [2, 2, 2] and report["steps_skipped_per_sample"] == [2, 2, 2]
    assert report["rows_per_scale"] == [6] * 7 + [None, 0, 0]  # scale 7: the refiner's prefill
    assert same(out, plain)[:8] == [True] * 8
    assert all((t == -1).all() for t in out.tokens[8:])


def test_fastvar_on_code_caches_the_refiners_first_cached_scale(code, code_plain):
    plain = code_plain
    out, report = tokens_of(code, "fastvar")
    # 13x13 is drafted by the refiner's prefill (no cache of its own yet), so it runs whole and 16x16 is pruned
    assert report["tokens_per_scale"][-3:] == [None, 169, 128]
    assert same(out, plain) == [True] * 9 + [False]


def test_speed_sanity_on_the_zoo(one_thread):
    from varbench.variants.zoo import ZooError

    try:
        variant = create_variant("var_zoo_d5")
    except ZooError as err:
        pytest.skip(f"zoo not present: {err}")
    labels = torch.arange(4)
    rows = []
    for name in ("none", "fastvar", "skipvar", "stagevar", "litevar"):
        apply_acceleration(variant, name)
        generate(variant, labels, SAMPLING, g_seed=0)  # warm-up
        start = time.perf_counter()
        out = generate(variant, labels, SAMPLING, g_seed=0)
        rows.append((name, time.perf_counter() - start, accel_report(variant, out.state).get("tokens_per_scale")))
        assert out.images.shape == (4, 3, 64, 64) and torch.isfinite(out.images).all()
    for name, seconds, tokens in rows:
        print(f"var_zoo_d5 batch 4 {name:9s} {seconds * 1e3:7.1f} ms  tokens/scale {tokens}")
