"""KV-cache policies: `full` and every policy at a 100% budget leave VAR's tokens untouched, each policy keeps a
hand-built known set, the cache's allocated bytes (not only the accounted ones) fall with the budget, 10% of
`full` at budget 0.1, calibrations survive a JSON round trip, CoDe's multi-scale prefill composes, bad args fail."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from varbench.harness import create_variant
from varbench.harness.cli import main
from varbench.harness.core.kv_cache import CompressedKVCache, KVView
from varbench.harness.core.loop import generate
from varbench.harness.core.registry import KV_POLICIES
from varbench.harness.core.sampling import SampleConfig
from varbench.variants.kv_base import grid_centres, model_key
from varbench.variants.kv_hack import CONTEXTUAL, STRUCTURAL, _VarianceStats
from varbench.variants.var import build_var
from varbench.variants.var_model import PATCH_NUMS

LABELS = torch.tensor([7, 420])
COMPRESSING = ("streaming", "h2o", "snapkv", "pyramidkv", "scalekv", "hack")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def small():
    """Depth 3 (3 heads), 155-token schedule: fast enough to run every policy."""
    return build_var(3, weights="random", vae_ch=32, patch_nums=PATCH_NUMS[155], seed=1)


@pytest.fixture(scope="module")
def tiny():
    """test_var: depth 2, VAR's 680-token schedule (budget 0.1 = 68 tokens per layer and head)."""
    return create_variant("test_var")


def run(v, policy, labels=LABELS, seed=3):
    v.kv_policy = policy
    try:
        return generate(v, labels, SampleConfig(), g_seed=seed)
    finally:
        v.kv_policy = None


def same_tokens(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


def uniform_calibration(v):
    depth, scales = v.cfg.depth, len(v.patch_nums)
    return {"current_ratio": [[0.5] * scales] * depth, "history_topk_ratio": [[0.5] * scales] * depth}


def mixed_heads_calibration():
    """Depth 3 × 3 heads; with alpha 0.5 the 4 lowest variances are contextual: every layer has both types."""
    return {"sigma": [[1.0, 0.0, 2.0], [0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]}


# -- VAR unchanged ------------------------------------------------------------------------------------
def test_full_policy_is_bit_identical_to_no_policy(small):
    plain, full = run(small, None), run(small, KV_POLICIES.get("full")())
    assert same_tokens(plain, full) and torch.equal(plain.images, full.images)
    c = small.cfg
    per_token = 2 * 2 * len(LABELS) * c.width * c.depth * 4  # K and V, CFG rows, width, layers, fp32
    assert full.state.kv_bytes == plain.state.kv_bytes == [per_token * e for _, e in small.net.begin_ends]
    assert full.state.kv_bytes_current == [per_token * pn * pn for pn in small.patch_nums]


def test_every_policy_at_a_full_budget_equals_full(small):
    ref = run(small, None)
    for name in COMPRESSING:
        policy = KV_POLICIES.get(name)(budget=1.0)
        if name == "scalekv":
            policy.calibrations[model_key(small)] = uniform_calibration(small)
        if name == "hack":
            policy.calibrations[model_key(small)] = mixed_heads_calibration()
            assert all(len(layer) == 2 for layer in policy.plan(small).layers)  # two head groups per layer
        out = run(small, policy)
        assert same_tokens(out, ref), name
        assert out.state.kv_bytes == ref.state.kv_bytes, name


# -- memory -------------------------------------------------------------------------------------------
def test_kv_bytes_at_budget_one_tenth_is_a_tenth_of_full_and_buffers_shrink(tiny):
    one = LABELS[:1]
    full = run(tiny, None, one)
    full_kv, full_alloc = max(full.state.kv_bytes), tiny.kv_buffer.allocated_bytes
    for name in COMPRESSING:
        policy = KV_POLICIES.get(name)(budget=0.1)
        if name == "scalekv":
            policy.calibrate(tiny, labels=one)
        policy.prepare(tiny)  # HACK calibrates itself on this model (10 labels); the others need nothing
        assert policy.calibration_source == {"scalekv": "calibrate()", "hack": "auto: 10 labels, g_seed 0"}.get(name)
        out = run(tiny, policy, one)
        ratio = max(out.state.kv_bytes) / full_kv
        assert 0.08 <= ratio <= 0.12, (name, ratio)
        cache = out.state.cache
        assert isinstance(cache, CompressedKVCache)
        # budget 68 + the largest scale (256) per layer, except drafter layers (ScaleKV) and PyramidKV's split
        assert cache.allocated_bytes <= 0.6 * full_alloc, (name, cache.allocated_bytes / full_alloc)
        assert out.state.kv_bytes_current[-1] == full.state.kv_bytes_current[-1]  # the current scale is whole
    streaming = run(tiny, KV_POLICIES.get("streaming")(budget=0.1), one).state.cache
    assert streaming.allocated_bytes == full_alloc * (68 + 256) // 680  # exactly budget + largest scale


def test_allocated_bytes_fall_with_the_budget(tiny):
    allocated = [KV_POLICIES.get("snapkv")(budget=b).cache(tiny, 4).allocated_bytes for b in (1.0, 0.5, 0.2, 0.1)]
    assert allocated == sorted(allocated, reverse=True) and len(set(allocated)) == 4
    per_slot = 2 * 2 * 4 * 128 * 4  # K and V, 2 layers, 4 rows, width 128, fp32
    assert allocated == [per_slot * s for s in (680, 340 + 256, 136 + 256, 68 + 256)]


def test_budget_as_a_token_count(small):
    out = run(small, KV_POLICIES.get("streaming")(budget=40))
    c = small.cfg
    assert max(out.state.kv_bytes) == 2 * 2 * len(LABELS) * c.width * c.depth * 4 * 40


# -- hand-built cases with known kept sets ------------------------------------------------------------
def view(keys: torch.Tensor, queries: torch.Tensor, n: int | None = None, **kw) -> KVView:
    """One batch row and head: keys (N, D), queries (n, D); the forward's scale is its n tokens."""
    N, n = keys.shape[0], n or queries.shape[0]
    kw.setdefault("scale_slots", (N - n, N))
    return KVView(0, kw.pop("kind", ""), queries[None, None], keys[None, None], kw.pop("si", 0), **kw)


def along(c: list[float], d: int = 4) -> torch.Tensor:
    """Keys c_j · e0: a query e0 gives logits c_j."""
    k = torch.zeros(len(c), d)
    k[:, 0] = torch.tensor(c)
    return k


def kept(policy, v: KVView, n_keep: int) -> list[int]:
    return policy.select(v, n_keep)[0, 0].tolist()


def test_streaming_keeps_sinks_and_the_recent_window():
    v = view(torch.randn(10, 4), torch.randn(3, 4))
    assert kept(KV_POLICIES.get("streaming")(sink_tokens=2), v, 6) == [0, 1, 6, 7, 8, 9]
    assert kept(KV_POLICIES.get("streaming")(sink_tokens=0), v, 3) == [7, 8, 9]  # sliding window


def test_h2o_keeps_heavy_hitters_accumulated_over_scales_and_the_recent_half():
    h2o = KV_POLICIES.get("h2o")(recent_ratio=0.5)
    keys = along([0, 0, 0, 0, 0, 0, 0, 0])
    keys[1, 1], keys[3, 2] = 6.0, 4.0  # key 1 answers queries along e1, key 3 along e2
    acc = torch.zeros(1, 1, 8)
    first = torch.zeros(2, 4)
    first[:, 1] = 1.0  # an earlier scale's two queries look at key 1 (logit 6)
    h2o.observe(view(keys[:6], first, state={"acc": acc[..., :6]}))
    second = torch.zeros(2, 4)
    second[:, 2] = 1.0  # this scale's queries look at key 3 (logit 4): key 1 stays heavier in total
    v = view(keys, second, state={"acc": acc})
    h2o.observe(v)
    assert acc[0, 0, 1] > acc[0, 0, 3] > acc[0, 0, 0]
    assert kept(h2o, v, 4) == [1, 3, 6, 7]  # 2 heavy hitters + 2 recent
    assert kept(h2o, v, 3) == [1, 6, 7]  # round(0.5 · 3) = 2 recent


def test_snapkv_pooling_prefers_a_cluster_over_a_spike():
    # Prefix keys 0..9, window keys 10, 11. The window's queries give key 2 the largest single vote, but keys
    # 6, 7, 8 together more: avg pooling (kernel 3) keeps the cluster's centre, no pooling the spike.
    keys = along([0, 0, 3.0, 0, 0, 0, 2.2, 2.4, 2.2, 0, 0, 0])
    q = torch.zeros(2, 4)
    q[:, 0] = 1.0
    v = view(keys, q)
    assert kept(KV_POLICIES.get("snapkv")(window=2, kernel=3), v, 3) == [7, 10, 11]
    assert kept(KV_POLICIES.get("snapkv")(window=2, kernel=1), v, 3) == [2, 10, 11]
    assert kept(KV_POLICIES.get("snapkv")(window=2, kernel=1), v, 4) == [2, 7, 10, 11]


def test_pyramidkv_budgets_fall_linearly_with_depth_at_a_fixed_total(tiny):
    plan = KV_POLICIES.get("pyramidkv")(budget=0.1).plan(tiny)  # 68 = window 32 + 36; low = 36 // 20 = 1
    last = [layer[0].budgets[-1] for layer in plan.layers]
    assert last == [32 + 71, 32 + 1] and sum(last) == 2 * 68
    assert plan.active == tuple(e > 68 for e in (1, 5, 14, 30, 55, 91, 155, 255, 424, 680))


def test_scalekv_grid_centres_and_both_scorings():
    assert grid_centres(8, 4) == [r * 8 + c for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)]
    assert grid_centres(13, 4)[:4] == [14, 17, 20, 23]  # cell side 13 // 4 = 3: rows and columns 1, 4, 7, 10
    d, hist = 4, 10
    keys = torch.zeros(hist + 64, d)
    keys[3, 1], keys[5, 2] = 1.0, 1.0  # history key 3 answers e1, key 5 answers e2
    keys[hist:, 3] = 1.0  # the current 8×8 map's keys answer e3 only
    q = torch.zeros(64, d)
    q[:, 2] = 5.0  # the model's (scaled) queries look at key 5
    x = torch.zeros(1, 64, d)
    x[0, :, 1] = 5.0  # the raw projection of the input looks at key 3
    attn = SimpleNamespace(mat_qkv=nn.Linear(d, 3 * d, bias=False), heads=1)
    nn.init.eye_(attn.mat_qkv.weight)  # raw query = x
    v = view(keys, q, x=x, attn=attn)
    window = [hist + i for i in grid_centres(8, 4)]
    for scoring, key in (("code", 3), ("paper", 5)):
        policy = KV_POLICIES.get("scalekv")(scoring=scoring, kernel=1)
        assert (policy.window_rows(v) + hist).tolist() == window
        assert kept(policy, v, 17) == sorted(window + [key]), scoring


def test_scalekv_types_drafters_by_selectivity_and_splits_budgets():
    v = SimpleNamespace(cfg=SimpleNamespace(depth=4, heads=4, width=256, seq_len=680), weights="w")
    scalekv = KV_POLICIES.get("scalekv")(budget=68, drafters=0.1)
    ends = [1, 5, 14, 30, 55, 91, 155, 255, 424, 680]
    cur = [[0.9] * 10 for _ in range(4)]
    cur[2][8] = cur[1][9] = 0.1  # diffuse layers: layer 2 at scale 8, layer 1 at scale 9
    scalekv.calibrations[model_key(v)] = {"current_ratio": cur, "history_topk_ratio": [[0.5] * 10] * 4}
    assert scalekv.drafters_of(v, 68, ends) == {(2, 8), (1, 9)}  # 0.1 × 4 layers × 5 compressed scales = 2
    groups = scalekv.groups(v, 68, ends)
    # drafters keep up to what full holds as far as the refiners keep their window (16); refiners share the rest
    b_d = min(424, 4 * 68 - 3 * 16)
    assert [g[0].budgets[8] for g in groups] == [(272 - b_d) // 3, (272 - b_d) // 3, b_d, (272 - b_d) // 3]
    assert sum(g[0].budgets[9] for g in groups) <= 4 * 68


def test_hack_types_heads_by_attention_variance_and_keeps_per_pattern():
    # Calibration: head 0 is a vertical stripe (every query on key 0), head 1 a diagonal (query i on key i).
    stats = _VarianceStats(depth=1, heads=2, last=0)
    stripe_k, stripe_q = torch.zeros(6, 6), torch.zeros(6, 6)
    stripe_k[0, 0], stripe_q[:, 0] = 20.0, 1.0
    keys, queries = torch.stack((stripe_k, 20 * torch.eye(6))), torch.stack((stripe_q, torch.eye(6)))
    stats.observe(KVView(0, "", queries[None], keys[None], 0, (0, 6)))
    sigma = stats.result()["sigma"][0]
    assert sigma[0] < 1e-6 < 0.5 < sigma[1]  # the stripe head has no column variance: contextual
    hack = KV_POLICIES.get("hack")(alpha=0.5)
    v = SimpleNamespace(cfg=SimpleNamespace(depth=1, heads=2, width=128, seq_len=680), weights="w")
    hack.calibrations[model_key(v)] = {"sigma": [sigma]}
    assert hack.head_types(v) == [[CONTEXTUAL, STRUCTURAL]]
    assert hack.split(68) == (27, 109)  # 0.5 · 27 + 0.5 · 109 = 68, B_C ≈ B_S / 4
    # Selection: 5 init tokens (scales 1², 2²), 10 intermediate, the current 3×3 scale. Queries look at 7 and 12.
    keys = torch.zeros(24, 4)
    keys[7, 0], keys[12, 1], keys[20, 2] = 5.0, 4.0, 3.0
    q = torch.zeros(9, 4)
    q[:, :3] = 1.0
    structural = view(keys, q, kind=STRUCTURAL, patch_nums=(1, 2, 3, 4))
    assert kept(hack, structural, 16) == [0, 1, 2, 3, 4, 7, 12] + list(range(15, 24))
    assert kept(hack, view(keys, q, kind=CONTEXTUAL, patch_nums=(1, 2, 3, 4)), 3) == [7, 12, 20]


# -- calibration, composition, errors -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["scalekv", "hack"])
def test_calibration_json_round_trip(small, tmp_path, name):
    policy = KV_POLICIES.get(name)(budget=0.3)
    data = policy.calibrate(small, labels=torch.tensor([1, 500]))[model_key(small)]
    shape = (3, 3) if name == "hack" else (3, len(small.patch_nums))
    field = "sigma" if name == "hack" else "current_ratio"
    assert torch.tensor(data[field]).shape == shape and data["labels"] == [1, 500]
    path = tmp_path / f"{name}.json"
    policy.save_calibration(path)
    loaded = KV_POLICIES.get(name)(budget=0.3, calibration=str(path))
    assert loaded.calibrations == json.loads(path.read_text())["models"] == policy.calibrations
    assert loaded.plan(small) == policy.plan(small) and loaded.calibration_source == f"file: {path}"
    a, b = run(small, policy), run(small, loaded)
    assert same_tokens(a, b) and max(a.state.kv_bytes) < max(run(small, None).state.kv_bytes)
    with pytest.raises(ValueError, match="no calibration"):
        KV_POLICIES.get(name)().plan(small)


def test_code_refiner_prefill_composes_with_a_policy():
    ref = generate(create_variant("test_code"), LABELS, SampleConfig(), g_seed=2)
    whole = generate(create_variant("test_code", kv_policy=KV_POLICIES.get("snapkv")(budget=1.0)), LABELS,
                     SampleConfig(), g_seed=2)
    assert same_tokens(ref, whole)
    code = create_variant("test_code", kv_policy=KV_POLICIES.get("h2o")(budget=0.1))
    out = generate(code, LABELS, SampleConfig(), g_seed=2)
    refiner = out.state.refiner  # its cache is released at decode; its byte counts remain
    per_token = ref.state.refiner.kv_bytes[-1] // 680
    assert refiner.kv_bytes_current[0] == per_token * 424  # the prefill wrote scales 0..8 in one pass
    assert refiner.kv_bytes == [per_token * 68] * 2  # then kept 68 tokens per layer and head


def test_unknown_policy_args_name_the_valid_ones():
    for name in COMPRESSING:
        with pytest.raises(ValueError, match=r"has no argument\(s\) 'bogus'; valid: .*budget"):
            KV_POLICIES.get(name)(bogus=1)
    with pytest.raises(ValueError, match="valid: budget, kernel, pooling, window"):
        KV_POLICIES.get("snapkv")(windows=8)
    with pytest.raises(ValueError, match="valid: \\(none\\)"):
        KV_POLICIES.get("full")(budget=0.1)
    with pytest.raises(ValueError, match="scoring must be one of code, paper"):
        KV_POLICIES.get("scalekv")(scoring="softmax")
    with pytest.raises(ValueError, match="budget must be"):
        KV_POLICIES.get("h2o")(budget=1.5)


def test_a_budget_below_the_window_names_the_smallest_budget_and_the_window_that_work(small):
    # The zoo's 155-token schedule: 0.1 is 16 tokens, below SnapKV's 32-token window (issue 13, item 17).
    for name in ("snapkv", "pyramidkv"):
        with pytest.raises(ValueError) as err:
            KV_POLICIES.get(name)(budget=0.1).plan(small)
        message = str(err.value)
        assert f"KV policy '{name}': a budget of 16 tokens (0.1 of this model's 155)" in message
        assert '"budget": 32, or 0.204 of this model' in message
        assert """--kv-args '{"budget": 0.1, "window": 16}'""" in message
        for works in ({"budget": 0.204}, {"budget": 32}, {"budget": 0.1, "window": 16}):
            assert KV_POLICIES.get(name)(**works).plan(small).layers  # each suggestion plans
        with pytest.raises(ValueError, match="a budget of 31 tokens"):
            KV_POLICIES.get(name)(budget=0.203).plan(small)  # 0.204 is the smallest fraction


def test_bench_records_the_policy_and_a_tenth_of_the_kv_bytes(capsys, tmp_path):
    argv = ["bench", "--batch", "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv + ["--kv-policy", "streaming", "--kv-args", '{"budget": 0.1}']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_bytes"] == 2 * 2 * 1 * 68 * 128 * 2 * 4  # K,V x CFG x batch x 68 tokens x width x depth
    assert result["kv_policy"] == "streaming" and result["kv_args"] == {"budget": 0.1, "sink_tokens": 4}
    assert result["kv_unverified"] == [] and result["kv_args_given"] == {"budget": 0.1}
    assert main(argv + ["--kv-policy", "streaming", "--kv-args", '{"budjet": 0.1}']) == 2
    assert "valid: budget, sink_tokens" in capsys.readouterr().err


def test_scalekv_below_its_window_gets_the_same_hint(small):
    policy = KV_POLICIES.get("scalekv")(budget=0.05)
    policy.calibrate(small)  # ScaleKV types its layers first; the budget is checked when it plans
    with pytest.raises(ValueError) as err:
        policy.plan(small)
    message = str(err.value)
    assert "KV policy 'scalekv': a budget of 8 tokens (0.05 of this model's 155)" in message
    assert """--kv-args '{"budget": 0.05, "window": 8}'""" in message
    suggested = KV_POLICIES.get("scalekv")(budget=0.05, window=8)
    suggested.calibrate(small)
    assert suggested.plan(small).layers  # the suggestion plans
