"""CoDe (arXiv:2411.17787): the official code's outputs replayed, the handover prefill against teacher forcing,
the drafter's cache freed at the handover, the degenerate cases against plain VAR, and per-model reporting."""

import gc
import json
import weakref

import pytest
import torch

from varbench.harness import create_variant
from varbench.harness.run.bench import bench_variant
from varbench.harness.core.checkpoints import CheckpointError
from varbench.harness.cli import main
from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import SampleConfig, guide
from varbench.variants import describe
from varbench.variants.code import CODE_SAMPLING, CoDe, code_flops_per_image
from varbench.variants.loading import load_var_net
from varbench.variants.var import VAR, EngineConfig, build_var, param_count
from varbench.variants.var_model import VARConfig, flops_per_image

from conftest import CONFORMANCE, need

LABELS = torch.tensor([3, 977])
SEED = 5


class _Probe:
    """Wraps a CoDe variant; keeps each step's guided logits, the discarded logits and, at the handover, what
    the drafter still holds (a weak reference to its cache buffer, so that freeing is observed, not assumed)."""

    def __init__(self, inner: CoDe, cfg: float):
        self.inner, self.cfg = inner, cfg
        self.logits, self.discards, self.buffer, self.capacity = [], [], None, None
        self.at_handover = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, state, step):
        if step.si == 0 and hasattr(state.drafter.cache, "capacity"):
            self.buffer, self.capacity = weakref.ref(state.drafter.cache.k), state.drafter.cache.capacity
        if step.si == self.inner.draft_steps:
            gc.collect()
            self.at_handover = {"held": state.drafter.cache.nbytes(), "buffer_alive": self.buffer() is not None}
        out = self.inner.forward(state, step)
        self.logits.append(guide(out.logits, self.cfg * step.cfg_ratio).clone())
        self.discards += [(si, lg.clone()) for si, lg in out.discard]
        return out


def test_official_code_fixture_passes_through_the_command_line(capsys):
    folder = need(CONFORMANCE / "code_d3_d2")
    assert main(["conformance", str(folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    checks = {c["check"]: c for c in report["checks"]}
    assert report["passed"] and all(c["pass"] for c in checks.values())
    for run in ("greedy_N6", "greedy_N8", "default_N6", "default_N8"):
        for prefix in ("", "engine.", "reference."):
            name = f"{prefix}code_{run}"
            assert checks[f"{name}.tokens"]["mismatches"] == 0
            assert checks[f"{name}.refiner_discarded"]["mismatches"] == 0
            assert checks[f"{name}.rng_calls"]["pass"] and checks[f"{name}.drafter_cache_freed"]["got"] == 0
            assert checks[f"{name}.handover_cfg_logits"]["max_abs_err"] < 1e-4
            assert checks[f"{name}.image"]["max_abs_err"] < 1e-3
        assert checks[f"code_{run}.teacher_forced_handover_logits"]["max_abs_err"] < 1e-4


def test_a_float16_checkpoint_loads_as_fp32_weights():
    net = load_var_net(need(CONFORMANCE / "code_d3_d2" / "drafter_d3.pth"), expect_depth=3)
    assert {p.dtype for p in net.parameters()} == {torch.float32}  # else an fp32 engine would compute in fp16


@pytest.mark.parametrize("n", [1, 6, 9])
def test_prefill_logits_are_the_refiners_teacher_forced_logits(n):
    code = create_variant("test_code", draft_steps=n)
    probe = _Probe(code, CODE_SAMPLING.cfg)
    out = generate(probe, LABELS, CODE_SAMPLING, g_seed=SEED)
    net, pn = code.refiner.net, code.patch_nums
    with torch.inference_mode():
        x_in = code.vae.tokens_to_var_input(out.tokens, pn)
        both = net(torch.cat((LABELS, torch.full_like(LABELS, net.cfg.num_classes))), x_in.repeat(2, 1, 1))
    begin, end = net.begin_ends[n]
    handover = guide(both[:, begin:end], CODE_SAMPLING.cfg * n / (len(pn) - 1))
    torch.testing.assert_close(probe.logits[n], handover, atol=1e-4, rtol=0)
    # the discarded draws read the refiner's own unguided conditional logits of every drafted scale
    assert [si for si, _ in probe.discards] == list(range(n))
    for si, logits in probe.discards:
        lo, hi = net.begin_ends[si]
        torch.testing.assert_close(logits, both[: len(LABELS), lo:hi], atol=1e-4, rtol=0)


def test_drafter_cache_is_sized_for_its_scales_and_freed_at_the_handover():
    n = 7
    code = create_variant("test_code", draft_steps=n)
    probe = _Probe(code, CODE_SAMPLING.cfg)
    out = generate(probe, LABELS, CODE_SAMPLING, g_seed=SEED)
    ends = [e for _, e in code.drafter.net.begin_ends]
    assert probe.capacity == ends[n - 1]  # 155 of 680 tokens
    assert probe.at_handover == {"held": 0, "buffer_alive": False}
    d, r, b2 = code.drafter.cfg, code.refiner.cfg, 2 * len(LABELS)
    per_token = {"d": 2 * d.depth * b2 * d.width * 4, "r": 2 * r.depth * b2 * r.width * 4}  # K and V, fp32
    assert out.state.kv_bytes[n - 1] == per_token["d"] * ends[n - 1]
    assert out.state.kv_bytes[n] == per_token["r"] * ends[n]  # the prefill cached scales 0..N at once
    assert out.state.kv_bytes[-1] == per_token["r"] * ends[-1]
    assert out.state.drafter.cache.nbytes() == 0 and out.state.refiner.cache.nbytes() == 0


def test_all_scales_drafted_is_the_drafter_alone():
    code = create_variant("test_code", draft_steps=10)
    alone = build_var(3, weights="random", vae_ch=32, seed=0)  # test_code's drafter
    for sampling in (CODE_SAMPLING, SampleConfig(top_k=1)):
        got = generate(code, LABELS, sampling, g_seed=SEED)
        want = generate(alone, LABELS, sampling, g_seed=SEED)
        assert all(torch.equal(g, w) for g, w in zip(got.tokens, want.tokens, strict=True))
        assert torch.equal(got.images, want.images)
    assert code.stages() == [("drafter", tuple(range(10)))]
    assert code_flops_per_image(code.drafter.cfg, code.refiner.cfg, 10) == flops_per_image(code.drafter.cfg)


@pytest.mark.parametrize("n", [2, 8])
def test_one_model_as_drafter_and_refiner_is_plain_var(n):
    """The official rng_alignment_check: the discarded draws keep the refiner's stream where VAR's would be."""
    var = create_variant("test_var")
    code = CoDe(var, VAR(var.net, var.vae), n)
    want = generate(var, LABELS, CODE_SAMPLING, g_seed=SEED)
    got = generate(code, LABELS, CODE_SAMPLING, g_seed=SEED)
    assert all(torch.equal(g, w) for g, w in zip(got.tokens, want.tokens, strict=True))
    torch.testing.assert_close(got.images, want.images, atol=1e-5, rtol=0)
    # one stream continued by the refiner instead of discards (CODE_SPEC §5): the same tokens on CPU
    single = generate(CoDe(var, VAR(var.net, var.vae), n, discard_draws=False), LABELS, CODE_SAMPLING, g_seed=SEED)
    assert all(torch.equal(g, w) for g, w in zip(single.tokens, want.tokens, strict=True))
    again = generate(var, LABELS, CODE_SAMPLING, g_seed=SEED)  # the drafter is a plain VAR after the handover
    assert all(torch.equal(g, w) for g, w in zip(again.tokens, want.tokens, strict=True))


class _NoDiscards(CoDe):
    """The refiner restarts its stream but skips the official discarded draws."""

    def _prefill(self, state):
        return super()._prefill(state)._replace(discard=())


def test_restarted_refiner_stream_without_discards_changes_the_refined_tokens():
    code = create_variant("test_code", draft_steps=6)
    want = generate(code, LABELS, CODE_SAMPLING, g_seed=SEED)
    got = generate(_NoDiscards(code.drafter, code.refiner, 6), LABELS, CODE_SAMPLING, g_seed=SEED)
    assert all(torch.equal(g, w) for g, w in zip(got.tokens[:6], want.tokens[:6]))
    assert sum(int((g != w).sum()) for g, w in zip(got.tokens[6:], want.tokens[6:])) > 50


def test_engine_and_reference_loop_give_the_same_tokens_in_fp32():
    engine = create_variant("test_code", draft_steps=6)
    reference = create_variant("test_code", draft_steps=6, engine=EngineConfig.reference())
    a = generate(engine, LABELS, CODE_SAMPLING, g_seed=SEED)
    b = generate(reference, LABELS, CODE_SAMPLING, g_seed=SEED)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))
    torch.testing.assert_close(a.images, b.images, atol=1e-4, rtol=0)  # NHWC vs NCHW decode


def test_bench_reports_each_models_time_and_memory():
    n = 8
    code = create_variant("test_code", draft_steps=n)
    r = bench_variant(code, 1, CODE_SAMPLING, warmup=0, repeats=1)
    per_scale, lat = r["latency_ms_per_scale"], r["latency_ms_per_model"]
    assert list(lat) == ["drafter", "refiner"]
    assert lat["drafter"] == pytest.approx(sum(per_scale[:n]), rel=1e-9)
    assert lat["refiner"] == pytest.approx(sum(per_scale[n:]), rel=1e-9)
    untimed = r["latency_ms_p50"] - lat["drafter"] - lat["refiner"] - r["vae_decode_ms"]  # labels, start
    assert 0 <= untimed < 0.2 * r["latency_ms_p50"]
    mem = r["memory_bytes_per_model"]
    assert mem["drafter"]["param_bytes"] == 4 * param_count(VARConfig(depth=3))
    assert mem["refiner"]["param_bytes"] == 4 * param_count(VARConfig(depth=2))
    assert mem["drafter"]["kv_bytes"] == 2 * 3 * 2 * 192 * 4 * 255  # K+V, 3 layers, 2 rows, width 192, 255 tokens
    assert mem["refiner"]["kv_bytes"] == 2 * 2 * 2 * 128 * 4 * 680
    assert r["params"] == param_count(VARConfig(depth=3)) + param_count(VARConfig(depth=2))
    assert r["model_flops_per_image_without_vae"] == code.flops_per_image()
    assert "latency_ms_per_model" not in bench_variant(create_variant("test_var"), 1, warmup=0, repeats=1)


def test_registered_names_count_both_models_and_check_their_arguments():
    both = param_count(VARConfig(depth=30)) + param_count(VARConfig(depth=16))
    assert describe("code_d30_d16")["params"] == f"{both:,}" == "2,320,303,876"
    assert describe("test_code")["family"] == "code"
    with pytest.raises(ValueError, match="drafter_weights"):
        create_variant("code_d30_d16", weights="var_d30.pth")
    with pytest.raises(ValueError, match="6, 7, 8, 9"):
        create_variant("code_d30_d16", finetuned=True, draft_steps=5)
    for flag in ({"finetuned": True}, {"training_free": False}):  # fine-tuned pair, never downloaded in tests
        with pytest.raises(CheckpointError, match="drafter_8.pth"):
            create_variant("code_d30_d16", allow_download=False, **flag)
    for n in (0, 11):
        with pytest.raises(ValueError, match="draft_steps"):
            create_variant("test_code", draft_steps=n)
