"""KV policies on Infinity (issue 14 item 5): every compressing policy at budget 0.1 holds a tenth of `full`'s
kv_bytes on test_infinity, `full` keeps the tokens of no policy (engine and reference modes), the two CFG halves
are compressed independently, ScaleKV's official selection keeps a hand-worked set (docs/INFINITY_SPEC.md §8),
its gate and budgets file (the released JSON format) set the plan, and HACK calibrates itself on Infinity.

test_infinity: depth 2, 2 heads, width 64 (head dim 32), the 0.06M 1:1 schedule (sides 1 2 4 6 8 12 16, cache ends
1 5 21 57 121 265 521); budget 0.1 = round(52.1) = 52 tokens per layer and head."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from varbench.harness.core.kv_cache import CompressedKVCache, KVView
from varbench.harness.core.loop import generate
from varbench.harness.core.registry import KV_POLICIES
from varbench.harness.core.sampling import SampleConfig
from varbench.variants.engine import EngineConfig
from varbench.variants.infinity_build import build_infinity
from varbench.variants.kv_base import model_key
from varbench.variants.kv_hack import CONTEXTUAL, STRUCTURAL
from varbench.variants.kv_policies import SnapKV
from varbench.variants.kv_scalekv import ScaleKV
from varbench.variants.kv_scalekv_official import budget_entry, official_window, read_budgets

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SAMPLING = SampleConfig(cfg=3.0, top_k=900, top_p=0.97, temperature=0.7)
LABELS = torch.tensor([0, 5])
ENDS = [1, 5, 21, 57, 121, 265, 521]
PER_TOKEN = 2 * 2 * 4 * 64 * 4  # K and V, 2 layers, 2B = 4 rows (cond + uncond), width 64, fp32
COMPRESSING = ("streaming", "h2o", "snapkv", "pyramidkv", "scalekv", "hack")


@pytest.fixture(scope="module")
def plain():
    """test_infinity without a policy, and its generation over LABELS."""
    v = build_infinity("test")
    return v, generate(v, LABELS, SAMPLING, g_seed=3)


def same_tokens(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))


# -- memory and exactness ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, args", [(n, {}) for n in COMPRESSING] + [("scalekv", {"selection": "official"})])
def test_every_compressing_policy_at_a_tenth_holds_a_tenth_of_full(plain, name, args):
    v, full = plain
    assert full.state.kv_bytes == [PER_TOKEN * e for e in ENDS]
    policy = KV_POLICIES.get(name)(budget=0.1, **args)
    if policy.needs_calibration:
        policy.calibrate(v, labels=LABELS)  # same architecture and seed as the model below: same model key
    out = generate(build_infinity("test", kv_policy=policy), LABELS, SAMPLING, g_seed=3)
    assert isinstance(out.state.cache, CompressedKVCache)
    # 52 tokens per layer and head on average (ScaleKV moves tokens between layers, HACK between heads; the
    # totals stay): 52 / 521 = 9.98% of full after the last scale, and the most held at any scale.
    assert out.state.kv_bytes[-1] == max(out.state.kv_bytes) == PER_TOKEN * 52
    ratio = out.state.kv_bytes[-1] / full.state.kv_bytes[-1]
    assert 0.08 <= ratio <= 0.12, (name, ratio)
    assert out.state.kv_bytes[:3] == full.state.kv_bytes[:3]  # 21 tokens fit the budget: nothing evicted yet
    assert out.state.kv_bytes_current == full.state.kv_bytes_current  # each scale's own keys are whole
    assert not same_tokens(out, full)


@pytest.mark.parametrize("engine", [EngineConfig("fp32"), EngineConfig.reference()], ids=["engine", "reference"])
def test_full_policy_keeps_the_tokens_of_no_policy(plain, engine):
    ref = plain[1] if engine == EngineConfig("fp32") else generate(build_infinity("test", engine=engine), LABELS,
                                                                    SAMPLING, g_seed=3)
    out = generate(build_infinity("test", engine=engine, kv_policy=KV_POLICIES.get("full")()), LABELS, SAMPLING,
                   g_seed=3)
    assert same_tokens(out, ref) and torch.equal(out.images, ref.images)
    assert out.state.kv_bytes == ref.state.kv_bytes == [PER_TOKEN * e for e in ENDS]


def test_every_policy_at_a_full_budget_keeps_the_tokens(plain):
    v, ref = plain
    for name in COMPRESSING:
        policy = KV_POLICIES.get(name)(budget=1.0)
        if policy.needs_calibration:
            policy.calibrate(v, labels=LABELS[:1])
        out = generate(build_infinity("test", kv_policy=policy), LABELS, SAMPLING, g_seed=3)
        assert same_tokens(out, ref), name


# -- CFG halves -------------------------------------------------------------------------------------
class _Recording(SnapKV):
    """SnapKV that keeps every view it selected on (cloned) with its kept slots."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def select(self, view: KVView, n_keep: int):
        keep = super().select(view, n_keep)
        self.seen.append((KVView(view.layer, view.kind, view.q.clone(), view.k.clone(), view.si, view.scale_slots,
                                 patch_nums=view.patch_nums), n_keep, keep))
        return keep


def test_cfg_halves_are_compressed_independently():
    policy = _Recording(budget=0.1)
    v = build_infinity("test", kv_policy=policy)
    generate(v, torch.tensor([3]), SAMPLING, g_seed=1)  # B = 1: row 0 conditional, row 1 unconditional
    assert len(policy.seen) == 2 * 4  # 2 layers × the 4 scales whose cache exceeds 52 (57, 121, 265, 521)
    differ = 0
    for view, n_keep, keep in policy.seen:
        assert keep.shape == (2, 2, n_keep)
        for row in (0, 1):  # a row's kept slots are what the policy picks for that row alone
            alone = KVView(view.layer, "", view.q[row:row + 1], view.k[row:row + 1], view.si, view.scale_slots)
            assert torch.equal(SnapKV.select(policy, alone, n_keep), keep[row:row + 1])
        differ += not torch.equal(keep[0], keep[1])
    assert differ > 0  # the halves attend differently, so they keep different positions


# -- ScaleKV's official selection ---------------------------------------------------------------------
def test_official_window_is_the_4x4_grid_of_cell_centres():
    # 8×8 map: cell side 2, centre (2 − 1)//2 = 0 → rows and cols 0 2 4 6; after 4 older keys.
    assert official_window(64, 16, 68) == [4 + 8 * r + c for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)]
    # 12×12: side 3, centre 1 → 1 4 7 10; 16×16: side 4, centre 1 → 1 5 9 13.
    assert official_window(144, 16, 144)[:4] == [13, 16, 19, 22]
    assert official_window(256, 16, 256)[:5] == [17, 21, 25, 29, 81]
    assert official_window(9, 16, 30) == list(range(14, 30))  # a 3×3 map is smaller than the grid: last 16
    assert official_window(16, 16, 20) == list(range(4, 20))  # 4×4: side 1, every token a centre


def _grid_case():
    """Hand-worked case, one row and head, head dim 2: 4 older keys (slots 0-3), then an 8×8 map (slots 4-67).

    Raw queries (x through mat_qkv's query rows = identity): the 16 window tokens have x = (1/16, 0), the
    others (0, 1), so the window's summed raw query is (1, 0). Keys are 0 except: slot 1 = (0.9, 0), slot 31
    (map raster 27 = row 3, col 3, not a centre) = (0.6, 0), the decoy slot 65 (raster 61) = (0, 5), and every
    window key = (2, 0). The model's own queries (view.q) all point at the decoy: (0, 1)."""
    window = official_window(64, 16, 68)  # 4 + {0 2 4 6 16 18 20 22 32 34 36 38 48 50 52 54}
    x = torch.zeros(1, 64, 2)
    x[0, :, 1] = 1.0
    for s in window:
        x[0, s - 4] = torch.tensor([1 / 16, 0.0])
    k = torch.zeros(1, 1, 68, 2)
    k[0, 0, 1, 0], k[0, 0, 31, 0], k[0, 0, 65, 1] = 0.9, 0.6, 5.0
    k[0, 0, window, 0] = 2.0
    attn = SimpleNamespace(mat_qkv=nn.Linear(2, 6, bias=False), heads=1)
    with torch.no_grad():
        attn.mat_qkv.weight.zero_()
        attn.mat_qkv.weight[:2] = torch.eye(2)
    q = torch.zeros(1, 1, 64, 2)
    q[..., 1] = 1.0
    return KVView(0, "", q, k, 3, (4, 68), x=x, attn=attn, patch_nums=(1, 1, 1, 8)), window


def test_official_selection_keeps_the_hand_worked_positions():
    view, window = _grid_case()
    # Scores (1/√2)·(summed raw query · k) with window columns at −inf: 0.9/√2 at slot 1, 0.6/√2 at slot 31, 0
    # elsewhere (the decoy's (0, 5) is orthogonal to (1, 0)). Max-pool 5 (±2 slots): 0.9/√2 on slots 0-3 (slot 4
    # is a window slot), 0.6/√2 on 29-33 (the nearest window slots, 26 and 36, lie outside), 0 elsewhere; the
    # window keys' 2.0 never spreads, being −inf before pooling. Capacity 25 = 16 window + the top 9 others:
    # exactly the two plateaus {0 1 2 3} and {29 30 31 32 33}; then sorted.
    expected = sorted([0, 1, 2, 3, 29, 30, 31, 32, 33] + window)
    official = KV_POLICIES.get("scalekv")(selection="official", budgets=None)
    keep = official.select(view, 25)
    assert keep.tolist() == [[expected]]
    ours = KV_POLICIES.get("scalekv")()  # scoring "code": the same rule, written apart
    assert ours.select(view, 25).tolist() == [[expected]]
    # Scoring with the model's own queries instead would rank the decoy's neighbourhood first.
    paper = KV_POLICIES.get("scalekv")(scoring="paper", kernel=5)
    assert 65 in paper.select(view, 25).tolist()[0][0]


class _RecordingScaleKV(ScaleKV):
    """ScaleKV that keeps every view it selected on (cloned, with the attention input for raw queries)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def select(self, view: KVView, n_keep: int):
        self.seen.append((replace(view, q=view.q.clone(), k=view.k.clone(), x=view.x.clone(), state={}), n_keep))
        return super().select(view, n_keep)


def test_scalekv_official_and_ours_keep_equally_scored_sets_in_a_generation(plain):
    """On every eviction of a real generation the two implementations keep the window and sets of other keys
    with the same pooled scores (max-pooling makes plateaus, so equal scores at the cut may be broken apart)."""
    v, _ = plain
    policy = _RecordingScaleKV(selection="official")
    policy.calibrations[model_key(v)] = {"current_ratio": [[0.5] * 7] * 2, "history_topk_ratio": [[0.5] * 7] * 2}
    generate(build_infinity("test", kv_policy=policy), LABELS, SAMPLING, g_seed=3)
    ours = KV_POLICIES.get("scalekv")()
    # 2 layers × 4 compressed scales, less the one drafter: with equal ASI the first ranked pair (layer 0, si 3)
    # keeps up to the full 57 tokens there, so it evicts nothing.
    assert [(view.layer, view.si) for view, _ in policy.seen] == [(1, 3)] + [(0, 4), (1, 4), (0, 5), (1, 5),
                                                                             (0, 6), (1, 6)]
    for view, n_keep in policy.seen:
        with torch.inference_mode():  # the recorded tensors and the model's weights, as in a generation
            check_equally_scored(policy, ours, view, n_keep)


def check_equally_scored(official: ScaleKV, ours: ScaleKV, view: KVView, n_keep: int) -> None:
    """Both keep (4 rows, 2 heads, n_keep) slots whose official pooled scores are the same multiset."""
    lo, hi = view.scale_slots
    window = torch.tensor(official_window(hi - lo, 16, view.N))
    raw = view.raw_queries(window - (view.N - view.n))
    logits = raw @ view.k.float().transpose(-1, -2) / math.sqrt(raw.shape[-1])
    logits[..., window] = float("-inf")
    pooled = torch.nn.functional.max_pool1d(logits.sum(-2), 5, stride=1, padding=2)
    pooled[..., window] = float("inf")  # kept by both
    a, b = ScaleKV.select(official, view, n_keep), ours.select(view, n_keep)
    assert a.shape == b.shape == (4, 2, n_keep)
    assert torch.equal(pooled.gather(-1, a).sort(-1).values, pooled.gather(-1, b).sort(-1).values)


def test_the_gate_holds_compression_until_the_cache_exceeds_it(plain):
    v, full = plain
    uniform = {"current_ratio": [[0.5] * 7] * 2, "history_topk_ratio": [[0.5] * 7] * 2}  # no drafter preference
    policies = [KV_POLICIES.get("scalekv")(selection="official", **gate) for gate in ({}, {"gate": 121},
                                                                                       {"gate": 650})]
    for policy in policies:
        policy.calibrations[model_key(v)] = uniform
    assert policies[0].plan(v).active == (False, False, False, True, True, True, True)  # gate = budget 52 < 57
    plan = policies[1].plan(v)
    assert plan.active == (False,) * 5 + (True, True)  # 121 is not above the gate: compression starts at 265
    assert plan.layers[0][0].budgets[:5] == tuple(ENDS[:5])
    # The released gate (650): no cache of this 521-token schedule exceeds it, so nothing is evicted.
    out = generate(build_infinity("test", kv_policy=policies[2]), LABELS, SAMPLING, g_seed=3)
    assert same_tokens(out, full) and out.state.kv_bytes == full.state.kv_bytes


# -- the budgets file -------------------------------------------------------------------------------
def _entry(flags, hi, lo):
    return {**{f"Block {i}": f for i, f in enumerate(flags)}, "High": sum(flags), "Max": hi, "Min": lo,
            "Limit": hi + 1}


def _write(tmp_path, data, name="budget.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_budgets_file_sets_each_layers_capacity(tmp_path, plain):
    v, full = plain
    # Scales past a gate of 52 are si 3..6 (ends 57 121 265 521): entries N = si + 2 = 5 6 7 8.
    data = {"Scale 5": _entry([1, 0], 56, 48), "Scale 6": _entry([0, 1], 100, 20),
            "Scale 7": _entry([1, 0], 80, 24), "Scale 8": _entry([0, 0], 60, 52)}
    path = _write(tmp_path, data)
    assert read_budgets(path) == {5: (56, 48), 6: (20, 100), 7: (80, 24), 8: (52, 52)}
    policy = KV_POLICIES.get("scalekv")(selection="official", budgets=path, gate=52)
    assert not policy.needs_calibration  # the file replaces the layer typing
    plan = policy.plan(v)
    # Before the gate every layer keeps its whole cache; Min 20 is raised to the 16-token window only if below.
    assert [g[0].budgets for g in plan.layers] == [(1, 5, 21, 56, 20, 80, 52), (1, 5, 21, 48, 100, 24, 52)]
    out = generate(build_infinity("test", kv_policy=policy), LABELS, SAMPLING, g_seed=3)
    per_layer_token = PER_TOKEN // 2
    assert out.state.kv_bytes[3:] == [per_layer_token * n for n in (56 + 48, 20 + 100, 80 + 24, 52 + 52)]
    assert out.state.kv_bytes[-1] / full.state.kv_bytes[-1] == pytest.approx(52 / 521)
    assert [budget_entry(si) for si in (7, 11, 12)] == [9, 13, 13]  # the 1M schedule: si 12 reuses "Scale 13"
    released = KV_POLICIES.get("scalekv")(budgets=path)  # no gate given: the released scripts' 650
    assert released.gate_tokens(52) == 650 and not any(released.plan(v).active)  # 521 tokens never exceed it


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["Scale 5"].pop("Max"), r"'Scale 5' has no 'Max'"),
    (lambda d: d["Scale 6"].update({"Block 1": 2}), r"'Scale 6' -> 'Block 1' must be 0 or 1, got 2"),
    (lambda d: d["Scale 6"].pop("Block 1"), r"'Scale 6' has no 'Block 1'"),
    (lambda d: d["Scale 5"].update({"Min": "48"}), r"'Scale 5' -> 'Min' must be a positive int, got '48'"),
    (lambda d: d["Scale 5"].update({"High": 2}), r"'Scale 5' -> 'High' is 2 but 1 blocks are 1"),
    (lambda d: d["Scale 5"].update({"Budget": 3}), r"'Scale 5' -> 'Budget' is not a known key"),
    (lambda d: d.update({"scale 9": {}}), r"key 'scale 9' is not of the form \"Scale N\""),
])
def test_a_malformed_budgets_file_names_the_key(tmp_path, edit, message):
    data = {"Scale 5": _entry([1, 0], 56, 48), "Scale 6": _entry([0, 1], 100, 20)}
    edit(data)
    with pytest.raises(ValueError, match=message):
        KV_POLICIES.get("scalekv")(selection="official", budgets=_write(tmp_path, data))


def test_a_budgets_file_for_another_model_or_schedule_is_refused(tmp_path, plain):
    v, _ = plain
    three = _write(tmp_path, {"Scale 5": _entry([1, 0, 0], 56, 48)}, "three.json")
    with pytest.raises(ValueError, match="lists 3 blocks; the model has 2"):
        KV_POLICIES.get("scalekv")(budgets=three, gate=52).plan(v)
    short = _write(tmp_path, {"Scale 5": _entry([1, 0], 56, 48)}, "short.json")
    with pytest.raises(ValueError, match=r"has no 'Scale 6', which scale index 4 needs .*121 tokens"):
        KV_POLICIES.get("scalekv")(budgets=short, gate=52).plan(v)
    with pytest.raises(ValueError, match="selection 'official' scores as the released code"):
        KV_POLICIES.get("scalekv")(selection="official", scoring="paper")


# -- HACK ----------------------------------------------------------------------------------------------
def test_hack_calibrates_itself_on_infinity_and_compresses(plain, tmp_path):
    _, full = plain
    policy = KV_POLICIES.get("hack")(budget=0.1)
    v = build_infinity("test", kv_policy=policy)  # prepare(): calibrates on the first min(10, 8 prompts) labels
    assert policy.calibration_source == "auto: 8 labels, g_seed 0"
    cal = policy.calibration_for(v)
    assert cal["labels"] == list(range(8)) and len(cal["sigma"]) == 2 and len(cal["sigma"][0]) == 2
    types = policy.head_types(v)
    assert sum(t == CONTEXTUAL for row in types for t in row) == 2  # alpha 0.5 of 4 heads
    # budget 52: B_C = int(52 / (0.5 + 0.5 / 0.25)) = 20, B_S = int((52 − 0.5·20) / 0.5) = 84
    assert policy.split(52) == (20, 84)
    for layer, groups in zip(types, policy.plan(v).layers, strict=True):
        for g in groups:
            heads = g.heads or (0, 1)
            assert all(layer[h] == g.kind for h in heads)
            assert g.budgets[3:] == ((84,) if g.kind == STRUCTURAL else (20,)) * 4  # from si 3 (57 > 52) on
    out = generate(v, LABELS, SAMPLING, g_seed=3)
    assert out.state.kv_bytes[-1] == PER_TOKEN * 52  # (2·20 + 2·84) head-slots = 4 heads × 52
    path = tmp_path / "hack.json"
    policy.save_calibration(path)
    again = KV_POLICIES.get("hack")(calibration=str(path))
    assert again.head_types(v) == types


def test_compression_needs_a_square_schedule():
    with pytest.raises(ValueError, match="square scale schedule"):
        build_infinity("test", h_div_w=0.5, kv_policy=KV_POLICIES.get("streaming")())
    wide = build_infinity("test", h_div_w=0.5, kv_policy=KV_POLICIES.get("full")())  # full needs no geometry
    assert wide.schedule[-1] == (11, 22) and math.prod(wide.schedule[-1]) == 242
