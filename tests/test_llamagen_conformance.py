"""LlamaGen against the official code's outputs (../shared/conformance/llamagen_tiny, fp32 CPU): every token exact in
engine and reference modes, logits and images in tolerance, greedy-with-CFG and cfg_interval against the spec; and
that the checks have teeth (VAR's sampler order or an identity RoPE at the class position fail them)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFORMANCE, need
from varbench.harness import SampleConfig, generate
from varbench.harness.cli import main
from varbench.harness.core.sampling import draw_tokens
from varbench.harness.core.sampling_raster import guide_raster
from varbench.variants.llamagen import build_llamagen

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = ("greedy_nocfg", "default_cfg2", "cfg4_k100_p09_t09")


@pytest.fixture(scope="module")
def folder():
    return need(CONFORMANCE / "llamagen_tiny")


def test_conformance_command_passes_with_every_token_exact(folder, capsys):
    assert main(["conformance", str(folder), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    checks = {c["check"]: c for c in report["checks"]}
    assert report["passed"] and all(c["pass"] for c in checks.values())
    for prefix in ("", "engine."):
        for setting in SETTINGS:
            assert checks[f"{prefix}{setting}.tokens"]["mismatches"] == 0
            assert checks[f"{prefix}{setting}.tokens_sha256"]["pass"]
            assert checks[f"{prefix}{setting}.post_cfg_logits"]["max_abs_err"] < 1e-4
            assert checks[f"{prefix}{setting}.raw_logits_first16"]["max_abs_err"] < 1e-5
        assert checks[f"{prefix}default_cfg2.image"]["max_abs_err"] < 1e-4
        for spec in ("greedy_cfg2", "greedy_cfg4_interval100"):
            entry = checks[f"{prefix}spec.{spec}"]
            assert entry["mismatches"] == 0 and entry["judged"] >= 0.9 * entry["of"]
    assert checks["gpt.weights_sha256"]["of"] == 18 and not checks["gpt.weights_sha256"]["mismatches"]
    assert checks["gpt.teacher_forced.default_cfg2.uncond"]["max_abs_err"] < 1e-5
    assert checks["vq.reencode"]["mismatches"] == 0 and checks["vq.decode_code"]["max_abs_err"] < 5e-5


def _fixture_run(folder, setting):
    variant = build_llamagen("test", weights=str(folder / "gpt_state_dict.pt"), vae="random", vae_ch=32)
    run = torch.load(folder / f"gen_{setting}.pt", weights_only=True)
    kw = run["kwargs"]
    sampling = SampleConfig(cfg=kw["cfg_scale"], top_k=kw["top_k"], top_p=kw["top_p"], temperature=kw["temperature"])
    return variant, run, sampling


def test_var_sampler_order_misses_the_official_tokens(folder):
    """The same model sampled in VAR's order (filters before the temperature, VAR's top-p) drifts off the fixture."""
    variant, run, sampling = _fixture_run(folder, "cfg4_k100_p09_t09")
    exact = generate(variant, run["labels"], sampling, g_seed=0).tokens[0]
    assert torch.equal(exact, run["tokens"].long())
    variant.sampler = lambda logits, guided, t, s, gen, ratio: draw_tokens(guide_raster(logits, guided, t), s, gen)
    drifted = generate(variant, run["labels"], sampling, g_seed=0).tokens[0]
    assert (drifted != run["tokens"].long()).sum() > 100


def test_identity_rope_at_the_class_position_fails_the_logits(folder):
    """The class position's RoPE rows are zero (its query and key vanish); an identity rotation there changes the
    teacher-forced logits far beyond the tolerance."""
    variant, _, _ = _fixture_run(folder, "greedy_nocfg")
    tf = torch.load(folder / "teacher_forced.pt", weights_only=True)
    case = tf["cases"]["greedy_nocfg"]
    net = variant.net
    with torch.inference_mode():
        assert (net.teacher_forced(case["tokens"], tf["labels"]) - case["logits_cond"]).abs().max() < 1e-5
        net.rope[0, :, 0] = 1.0  # cos 1, sin 0: identity
        assert (net.teacher_forced(case["tokens"], tf["labels"]) - case["logits_cond"]).abs().max() > 1e-2
