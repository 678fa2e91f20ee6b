"""SJD, LANTERN and ZipAR on the tiny random LlamaGen (variants/accel/{sjd,lantern,zipar}.py): registration and
argument checks, the settings that disable each method giving plain LlamaGen's tokens, and each method's defining
behaviour: SJD's drafts and acceptance (hand-counted on a context-free peaked model; exact at greedy), LANTERN's
relaxed acceptance (closed form; delta = 0 is SJD), ZipAR's parallel rows (the window rule on a 4x4 grid)."""

from __future__ import annotations

from itertools import accumulate
from types import SimpleNamespace

import pytest
import torch

import varbench.variants  # noqa: F401  (registers the variants)
from varbench.harness.cli import main
from varbench.harness.core.loop import generate
from varbench.harness.core.registry import create_variant
from varbench.harness.core.sampling import SampleConfig
from varbench.variants.accel import ACCELERATIONS, accel_report, apply_acceleration
from varbench.variants.accel.lantern import Lantern, nearest_codes
from varbench.variants.accel.zipar import ZipStep, zipar_schedule
from varbench.variants.llamagen import build_llamagen
from varbench.variants.llamagen_model import LlamaGenConfig

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = torch.tensor([207, 360])
SAMPLING = SampleConfig(cfg=2.0, top_k=50, top_p=0.9, temperature=0.9)
GREEDY = SampleConfig(cfg=2.0, top_k=1, top_p=1.0, temperature=1.0)


@pytest.fixture(scope="module")
def tiny():
    return build_llamagen("test", weights="random", vae="random", vae_ch=32, seed=3)


def run(model, sampling: SampleConfig, acceleration: str | None = None, **args):
    """One call with an acceleration (None: plain LlamaGen); the model is left plain afterwards."""
    apply_acceleration(model, acceleration, **args)
    try:
        out = generate(model, LABELS, sampling, g_seed=5)
    finally:
        apply_acceleration(model, None)
    return out.tokens[0], accel_report(model, out.state)


@pytest.fixture(scope="module")
def plain(tiny):
    return run(tiny, SAMPLING)[0]


# -- registry and arguments -------------------------------------------------------------------------------
def test_the_three_methods_are_registered_and_listed(capsys):
    assert {"sjd", "lantern", "zipar"} <= set(ACCELERATIONS.list())
    for name in ("sjd", "lantern", "zipar"):
        assert "arXiv:" in ACCELERATIONS.get(name).__doc__
    assert main(["list", "*a*"]) == 0
    listed = capsys.readouterr().out
    assert all(f"| {name} " in listed for name in ("lantern", "zipar"))


@pytest.mark.parametrize("name, args, message", [
    ("sjd", {"windows": 4}, "has no argument.*'windows'; valid: init, init_seed, window"),
    ("sjd", {"window": -1}, "window must be an integer >= 0"),
    ("sjd", {"init": "vertical"}, "init must be one of random, repeat_horizon"),
    ("lantern", {"lambda": 5}, "valid: delta, init, init_seed, k, window"),
    ("lantern", {"delta": -0.1}, "delta must be a number >= 0"),
    ("zipar", {"window_size": 8}, "valid: window$"),
])
def test_bad_arguments_are_named_with_the_valid_ones(name, args, message):
    with pytest.raises(ValueError, match=message):
        ACCELERATIONS.get(name)(**args)


def test_methods_apply_to_their_own_family_only(tiny):
    var = create_variant("test_var", patch_nums=(1, 2, 3))
    with pytest.raises(ValueError, match="'sjd' decodes raster .* generates by scales"):
        apply_acceleration(var, "sjd")
    with pytest.raises(ValueError, match="'fastvar' modifies VAR's scale steps; 'test_llamagen' is a raster"):
        apply_acceleration(tiny, "fastvar")
    with pytest.raises(ValueError, match="window must be 0 .* below the grid side 16, got 16"):
        apply_acceleration(tiny, "zipar", window=16)
    assert tiny.acceleration is None


# -- the disabling settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sjd", "lantern", "zipar"])
def test_window_zero_gives_plain_llamagen_tokens(tiny, plain, name):
    tokens, report = run(tiny, SAMPLING, name, window=0)
    assert torch.equal(tokens, plain)
    assert report["network_evals"] == 256 and report["tokens_per_step"] == [1] * 256
    assert report["drafts_proposed"] == 0 and report["acceptance_rate"] == 1.0


# -- SJD -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["random", "repeat_horizon"])
def test_sjd_is_exact_at_greedy(tiny, init):
    """At top_k = 1 the target is deterministic, so speculative Jacobi decoding must give greedy's tokens."""
    greedy = run(tiny, GREEDY)[0]
    tokens, report = run(tiny, GREEDY, "sjd", init=init)
    assert torch.equal(tokens, greedy)
    assert sum(report["tokens_per_step"]) == 256 and report["network_evals"] == len(report["tokens_per_step"])
    assert 0.0 <= report["acceptance_rate"] <= 1.0


@pytest.fixture(scope="module")
def context_free(one_thread):
    """Every class and code embedding equal: attention averages identical values, so each position's logits are
    the same whatever the context, and top_k = 1 makes one token t* certain everywhere."""
    model = build_llamagen("test", weights="random", vae="random", vae_ch=32, seed=3)
    with torch.no_grad():
        row = model.net.tok_embeddings.weight[0].clone()
        model.net.tok_embeddings.weight[:] = row
        model.net.cls_embedding.embedding_table.weight[:] = row
    return model


def test_sjd_accepts_every_jacobi_draft_of_a_peaked_context_free_model(context_free):
    """Window 16, repeat_horizon, 16x16 grid; hand count (no random draft hits t* with init_seed 1):
    step 1 (n = 0): the drafts are a random R repeated, rejected at once; the draws (all t*) become drafts.
    step 2 (n = 1): 16 carried t* accepted + bonus: 17 tokens. step 3 (n = 18): drafts 18..31 repeat t*, 32 is
    column 0 (random): 14 accepted, 15 tokens. step 4 (n = 33): 15 accepted (the random one is 48), 16 tokens;
    likewise from n = 49, 65, ..., 225 (12 steps); last (n = 241): window 14, all accepted + bonus: 15 tokens.
    Accepted per row 0 + 16 + 14 + 15 + 12·15 + 14 = 239 of 16·16 + 14 = 270 drafted."""
    plain_tokens = run(context_free, GREEDY)[0]
    tokens, report = run(context_free, GREEDY, "sjd", init_seed=1)
    assert torch.equal(tokens, plain_tokens) and plain_tokens.unique().numel() == 1
    assert report["tokens_per_step"] == [1, 17, 15] + [16] * 13 + [15]
    assert report["network_evals"] == 17 < 256
    assert (report["drafts_accepted"], report["drafts_proposed"]) == (2 * 239, 2 * 270)
    assert report["acceptance_rate"] == pytest.approx(239 / 270)


def test_sjd_records_its_acceptance_when_sampling(tiny):
    tokens, report = run(tiny, SAMPLING, "sjd")
    assert tokens.shape == (2, 256) and sum(report["tokens_per_step"]) == 256
    assert 0 < report["drafts_accepted"] <= report["drafts_proposed"]
    assert report["acceptance_rate"] == report["drafts_accepted"] / report["drafts_proposed"]
    assert 0.0 < report["acceptance_rate"] < 1.0
    assert report["network_evals"] == len(report["tokens_per_step"]) < 256


# -- LANTERN -------------------------------------------------------------------------------------------------
def test_lantern_with_delta_zero_is_sjd(tiny):
    sjd_tokens, sjd_report = run(tiny, SAMPLING, "sjd")
    tokens, report = run(tiny, SAMPLING, "lantern", delta=0.0)
    assert torch.equal(tokens, sjd_tokens) and report == sjd_report


def test_nearest_codes_exclude_the_code_itself():
    codebook = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert nearest_codes(codebook, 5).tolist() == [[1, 2, 3], [0, 2, 3], [1, 0, 3], [2, 1, 0]]


def test_lantern_pools_the_nearest_mass_within_delta_and_zeroes_it_in_the_residual():
    """Codes on a line at 0, 1, 3, 7; draft 0 (neighbours 1, 2, 3); p = (0.1, 0.05, 0.04, 0.81).
    delta 0.1, k 3: cumulative neighbour mass 0.05, 0.09, 0.90 -> pool 0.09, p~(0) = 0.19, and q' zeroes codes 1..3.
    delta 1.5 (relative: bound (1.5 - 1)·p(0) = 0.05): pool 0.05, p~(0) = 0.15. k 1: code 1 only, p~(0) = 0.15.
    delta 0.01: nothing pooled, p~(0) = p(0) and q' = q."""
    vq = SimpleNamespace(quantize=SimpleNamespace(embedding=SimpleNamespace(
        weight=torch.tensor([[0.0], [1.0], [3.0], [7.0]]))))
    variant = SimpleNamespace(vq=vq)
    p = torch.tensor([[[0.1, 0.05, 0.04, 0.81]]])
    q = torch.tensor([[[0.7, 0.1, 0.1, 0.1]]])
    draft = torch.tensor([[0]])
    for args, mass in (({"k": 3, "delta": 0.1}, 0.19), ({"k": 3, "delta": 1.5}, 0.15), ({"k": 1, "delta": 0.1}, 0.15),
                       ({"k": 3, "delta": 0.01}, 0.1)):
        accept, _ = Lantern(**args).relaxation(variant, q)
        assert accept(p, draft).item() == pytest.approx(mass)
    _, residual = Lantern(k=3, delta=0.1).relaxation(variant, q)
    assert torch.equal(residual(p, draft), torch.tensor([[[0.7, 0.0, 0.0, 0.0]]]))
    _, residual = Lantern(k=3, delta=0.01).relaxation(variant, q)
    assert torch.equal(residual(p, draft), q)


def test_lantern_accepts_more_than_sjd_with_a_wide_neighbourhood(tiny):
    _, sjd_report = run(tiny, SAMPLING, "sjd")
    _, report = run(tiny, SAMPLING, "lantern", k=255, delta=0.5)
    assert report["acceptance_rate"] > sjd_report["acceptance_rate"]
    assert report["network_evals"] < sjd_report["network_evals"]


# -- ZipAR ---------------------------------------------------------------------------------------------------
# 4x4 grid, window 2, by hand from the official bookkeeping (raster index r·4 + c; position = 1 + index fed):
# row 0 token by token; row 1 from its predecessor (0, 3); row 2 starts when row 1 holds 2 tokens, fed the stand-in
# (0, 3) = 3 at row 1's last slot (position 8); row 3 likewise with the stand-in 7, the latest of row 1, at
# position 12; a finished row's last token is fed once more at its slot (7 at 8, 11 at 12), its logits dropped.
SCHEDULE_4X4_W2 = [
    ZipStep((-1,), (0,), (0,), -1), ZipStep((0,), (1,), (1,), -1), ZipStep((1,), (2,), (2,), -1),
    ZipStep((2,), (3,), (3,), -1), ZipStep((3,), (4,), (4,), 0), ZipStep((4,), (5,), (5,), 1),
    ZipStep((5, 3), (6, 8), (6, 8), 2), ZipStep((6, 8), (7, 9), (7, 9), 4),
    ZipStep((7, 9, 7), (8, 10, 12), (10, 12), 6), ZipStep((10, 12), (11, 13), (11, 13), 8),
    ZipStep((11, 13), (12, 14), (14,), 10), ZipStep((14,), (15,), (15,), 11),
]


def test_zipar_schedule_follows_the_window_rule():
    assert zipar_schedule(4, 2) == SCHEDULE_4X4_W2
    assert [len(z.out) for z in zipar_schedule(4, 0)] == [1] * 16
    for grid, window in ((16, 8), (24, 8), (16, 1)):
        steps = zipar_schedule(grid, window)
        out = [t for z in steps for t in z.out]
        assert sorted(out) == list(range(grid * grid))  # every token once
        for z in steps:  # a row's token is sampled only once the row above holds `window` tokens more
            done = {t for y in steps[:steps.index(z)] for t in y.out}
            for t in z.out:
                r, c = divmod(t, grid)
                assert r == 0 or all((r - 1) * grid + j in done for j in range(min(c + window, grid)))


def test_zipar_decodes_rows_in_parallel_on_a_4x4_grid(one_thread):
    model = build_llamagen("test", weights="random", vae="random", vae_ch=32, seed=3,
                           config=LlamaGenConfig(n_layer=2, n_head=2, dim=64, vocab_size=256, block_size=16))
    greedy = generate(model, LABELS, GREEDY, g_seed=0).tokens[0]
    apply_acceleration(model, "zipar", window=2)
    out = generate(model, LABELS, GREEDY, g_seed=0)
    report = accel_report(model, out.state)
    assert report["tokens_per_step"] == [len(z.out) for z in SCHEDULE_4X4_W2]
    assert report["network_evals"] == 12 and report["acceptance_rate"] == 1.0
    # tokens 0..7 see only decoded slots (a query at position p reads slots <= p), so they are greedy's own
    assert torch.equal(out.tokens[0][:, :8], greedy[:, :8])


# -- composition with the engine and the loop's settings ---------------------------------------------------------
@pytest.mark.parametrize("name", ["sjd", "lantern", "zipar"])
def test_engine_and_reference_draw_the_same_tokens_under_each_method(tiny, name):
    from varbench.variants.engine import EngineConfig

    reference = build_llamagen("test", weights="random", vae="random", vae_ch=32, seed=3,
                               engine=EngineConfig.reference())
    tokens, report = run(tiny, SAMPLING, name)
    ref_tokens, ref_report = run(reference, SAMPLING, name)
    assert torch.equal(tokens, ref_tokens) and report == ref_report


def test_sjd_is_exact_at_greedy_with_cfg_interval_and_without_guidance(tiny):
    """A window never crosses the first unguided token (cfg_interval), and cfg <= 1 runs the conditional rows only."""
    no_cfg = SampleConfig(cfg=1.0, top_k=1, top_p=1.0)
    assert torch.equal(run(tiny, no_cfg, "sjd")[0], run(tiny, no_cfg)[0])
    tiny.cfg_interval = 100
    try:
        greedy = run(tiny, GREEDY)[0]
        tokens, report = run(tiny, GREEDY, "sjd")
    finally:
        tiny.cfg_interval = -1
    assert torch.equal(tokens, greedy)
    assert 102 in list(accumulate(report["tokens_per_step"]))  # a step ends at token 101, the last guided one
