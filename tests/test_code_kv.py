"""CoDe composed with KV policies: `full` on both models changes nothing; a compressing policy on the drafter
only or the refiner only runs through the one loop, shrinks that model's allocated cache (the other's is
untouched), changes exactly the scales that attend over a compressed cache, and the bench reports each
forward's own keys and values apart from what is kept."""

import json

import pytest
import torch

from varbench.harness import create_variant
from varbench.harness.run.bench import bench_variant
from varbench.harness.cli import main
from varbench.harness.core.kv_cache import CompressedKVCache, StaticKVCache
from varbench.harness.core.loop import generate
from varbench.harness.core.registry import KV_POLICIES
from varbench.variants.code import CODE_SAMPLING, CoDe

LABELS = torch.tensor([3, 977])
SEED = 5
N = 8  # test_code's draft steps: the drafter runs scales 0..7 (255 tokens), the refiner's prefill 0..8 (424)
# Bytes per cached token: K and V × layers × CFG rows (2 per label) × width × fp32.
DRAFTER_TOKEN = 2 * 3 * 2 * len(LABELS) * 192 * 4  # drafter: depth 3, width 192
REFINER_TOKEN = 2 * 2 * 2 * len(LABELS) * 128 * 4  # refiner: depth 2, width 128
BUDGET = 68  # 0.1 × 680 tokens per layer and head


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class _Caches:
    """Wraps a CoDe variant; after each step records the allocated bytes of the cache of the model that ran
    (both caches are released by the end of the call, so they are observed while alive)."""

    def __init__(self, inner: CoDe):
        self.inner = inner
        self.allocated: dict[str, int] = {"drafter": 0, "refiner": 0}
        self.kinds: dict[str, type] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, state, step):
        out = self.inner.forward(state, step)
        name = "drafter" if step.si < self.inner.draft_steps else "refiner"
        cache = getattr(state, name).cache
        self.allocated[name] = max(self.allocated[name], cache.allocated_bytes)
        self.kinds[name] = type(cache)
        return out


def run(**kwargs):
    probe = _Caches(create_variant("test_code", draft_steps=N, **kwargs))
    return probe, generate(probe, LABELS, CODE_SAMPLING, g_seed=SEED)


def differing(a, b) -> list[int]:
    """Scales whose tokens differ between two runs."""
    return [si for si, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=True)) if not torch.equal(x, y)]


@pytest.fixture(scope="module")
def plain():
    return run()


def test_full_on_both_models_is_bit_identical_to_no_policy(plain):
    probe, ref = plain
    full = KV_POLICIES.get("full")()
    same_probe, out = run(kv_policy=full)
    assert differing(ref, out) == [] and torch.equal(ref.images, out.images)
    assert out.state.kv_bytes == ref.state.kv_bytes and out.state.kv_bytes_current == ref.state.kv_bytes_current
    assert same_probe.allocated == probe.allocated == {"drafter": DRAFTER_TOKEN * 255, "refiner": REFINER_TOKEN * 680}
    assert same_probe.kinds == {"drafter": StaticKVCache, "refiner": StaticKVCache}
    # Per-model policies given apart compose the same way.
    _, apart = run(drafter_kv_policy=full, refiner_kv_policy=full)
    assert differing(ref, apart) == []


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_a_compressing_drafter_alone(plain, name):
    probe, ref = plain
    policy = KV_POLICIES.get(name)(budget=0.1)
    comp, out = run(drafter_kv_policy=policy)
    assert comp.inner.drafter.kv_policy is policy and comp.inner.refiner.kv_policy is None
    assert comp.kinds == {"drafter": CompressedKVCache, "refiner": StaticKVCache}
    # Budget + the largest drafted scale (100 tokens) instead of the 255 the drafter's full cache holds.
    assert comp.allocated == {"drafter": DRAFTER_TOKEN * (BUDGET + 100), "refiner": probe.allocated["refiner"]}
    assert comp.allocated["drafter"] < probe.allocated["drafter"]
    # A full cache first exceeds 68 tokens after scale 5 (91): scales 0..5 match, the later ones attend over
    # the kept 68 and change.
    ends = [1, 5, 14, 30, 55, 91, 155, 255]
    assert out.state.drafter.kv_bytes == [DRAFTER_TOKEN * min(e, BUDGET) for e in ends]
    assert ref.state.drafter.kv_bytes == [DRAFTER_TOKEN * e for e in ends]
    changed = differing(ref, out)
    assert changed and min(changed) >= 6 and changed[0] < N, changed
    assert out.state.refiner.kv_bytes == [REFINER_TOKEN * 424, REFINER_TOKEN * 680]  # the refiner keeps all


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_a_compressing_refiner_alone(plain, name):
    probe, ref = plain
    comp, out = run(refiner_kv_policy=KV_POLICIES.get(name)(budget=0.1))
    assert comp.kinds == {"drafter": StaticKVCache, "refiner": CompressedKVCache}
    # The prefill writes scales 0..8 (424 tokens) in one forward, so the buffer grows to 424 slots; full's
    # holds 680.
    assert comp.allocated == {"drafter": probe.allocated["drafter"], "refiner": REFINER_TOKEN * 424}
    assert comp.allocated["refiner"] < probe.allocated["refiner"]
    assert out.state.drafter.kv_bytes == ref.state.drafter.kv_bytes
    assert out.state.refiner.kv_bytes == [REFINER_TOKEN * BUDGET] * 2  # 10% of full's 680 after the last scale
    assert out.state.refiner.kv_bytes_current == [REFINER_TOKEN * 424, REFINER_TOKEN * 256]
    # The prefill attends over everything before evicting: only scale 9 sees the compressed cache.
    assert differing(ref, out) == [9]


def test_bench_reports_the_current_scale_apart_per_model():
    code = create_variant("test_code", draft_steps=N, refiner_kv_policy=KV_POLICIES.get("streaming")(budget=0.1))
    r = bench_variant(code, 1, CODE_SAMPLING, warmup=0, repeats=1)
    drafter, refiner = DRAFTER_TOKEN // len(LABELS), REFINER_TOKEN // len(LABELS)  # batch 1
    mem = r["memory_bytes_per_model"]
    assert mem["drafter"]["kv_bytes"] == drafter * 255 and mem["drafter"]["kv_bytes_current"] == drafter * 100
    assert mem["refiner"]["kv_bytes"] == refiner * BUDGET and mem["refiner"]["kv_bytes_current"] == refiner * 424
    assert r["kv_bytes"] == drafter * 255 and r["kv_bytes_current"] == refiner * 424
    assert len(r["kv_bytes_current_per_scale"]) == 10


@pytest.mark.parametrize("policy", [None, "streaming"])
def test_bench_kv_bytes_current_is_the_largest_scale_whole(capsys, policy, tmp_path):
    """test_var: the last scale's 16×16 map, every layer, K and V, both CFG halves, whatever the policy keeps."""
    argv = ["bench", "--batch", "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]
    if policy:
        argv += ["--kv-policy", policy, "--kv-args", '{"budget": 0.1}']
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    per_token = 2 * 2 * 2 * 1 * 128 * 4  # K,V x depth 2 x CFG x batch 1 x width 128 x fp32
    assert result["kv_bytes_current"] == per_token * 256 == 2**20
    assert result["kv_bytes_current_per_scale"] == [per_token * pn * pn for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    assert result["kv_bytes"] == per_token * (68 if policy else 680)
