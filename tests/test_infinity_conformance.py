"""Infinity against the official code's outputs (conformance/infinity_tiny, fp32 CPU): a fast subset of the
checker here (VAE, RoPE, the teacher-forced forward, one exact free run per mode, one bf16 replay); the whole
folder through `varbench conformance` is marked slow (about a minute on 2 CPUs)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from varbench.harness.conformance import fixture_kind
from varbench.harness.conformance import infinity as conf
from varbench.variants.engine import EngineConfig
from varbench.variants.infinity import Infinity
from varbench.variants.infinity_loading import load_bsq_vae, load_infinity_net

from conftest import CONFORMANCE, need

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder():
    return need(CONFORMANCE / "infinity_tiny")


@pytest.fixture(scope="module")
def modules(folder):
    return load_infinity_net(folder / "infinity_tiny.pth"), load_bsq_vae(folder / "vae_tiny.pth")


def _variant(folder, modules, sub: str, engine: EngineConfig, setting: str):
    run = torch.load(folder / sub / f"{setting}.pt", weights_only=True)
    text = torch.load(folder / "text_standins.pt", weights_only=True)
    args = run["args"]["gen_one_img"]
    negative = text[args["negative_prompt"]] if args["negative_prompt"] else None
    variant = Infinity(*modules, engine, prompts=[text[args["prompt"]]], negative=negative, pn="0.06M",
                       xattn=conf.VARIANTS[sub])
    return variant, run, conf._sampling(args)


def _failed(checks):
    return [c for c in checks if not c["pass"]]


def test_the_folder_is_recognised_and_the_counts_match(folder, modules):
    meta = json.loads((folder / "meta.json").read_text())
    assert fixture_kind(folder, meta) == "infinity"
    assert conf._count("p", modules[0], meta["config"]["infinity"]["params"])["pass"]  # 1,469,128 with buffers
    assert sum(p.numel() for p in modules[0].parameters()) == 1_467_976  # docs/INFINITY_SPEC.md §7


def test_vae_rope_and_teacher_forcing(folder, modules):
    checks = conf._vae_checks(modules[1], folder / "fp32xattn" / "teacher_forcing.pt", CPU) + conf._rope_checks(folder)
    for sub, tol in (("fp32xattn", 1e-4), ("official_bf16xattn", conf.BF16_XATTN_LOGITS_TOL)):
        variant = Infinity(*modules, EngineConfig.reference(), pn="0.06M", xattn=conf.VARIANTS[sub])
        tf = conf._teacher_forcing_checks(variant, folder / sub / "teacher_forcing.pt",
                                          torch.load(folder / "text_standins.pt", weights_only=True), sub, tol, CPU)
        checks += tf
        if sub == "fp32xattn":
            assert max(c["max_abs_err"] for c in tf) < 1e-5  # README: fp32 paths agree to ~1e-6
    assert not _failed(checks), _failed(checks)
    assert {c["check"] for c in checks} >= {"vae.msbsq_bits", "vae.decode", "vae.tf_image_bsc.inputs",
                                            "rope.positions_all_templates"}


@pytest.mark.parametrize("engine", [EngineConfig("fp32"), EngineConfig.reference()], ids=["engine", "reference"])
def test_every_bit_of_the_fp32xattn_run_is_exact(folder, modules, engine):
    variant, run, sampling = _variant(folder, modules, "fp32xattn", engine, "setting_C_cfg_tau_schedule_negprompt")
    checks = conf._free_run_checks(variant, run, sampling, "C", True, 1e-4)
    assert not _failed(checks), checks
    assert checks[0]["mismatches"] == 0 and checks[0]["agreement"] == 1.0
    assert next(c["max_abs_err"] for c in checks if c["check"] == "C.image") < 1e-4


def test_bf16_cross_attention_replay_is_within_tolerance(folder, modules):
    variant, run, sampling = _variant(folder, modules, "official_bf16xattn", EngineConfig.reference(),
                                      "setting_B_released_default")
    checks = {c["check"]: c for c in conf._replay_checks(variant, run, sampling, "B", conf.BF16_XATTN_LOGITS_TOL,
                                                          True)}
    assert not _failed(checks.values()), _failed(checks.values())
    logits, bits = checks["B.replay.raw_logits"], checks["B.replay.bits"]
    assert 1e-4 < logits["max_abs_err"] < conf.BF16_XATTN_LOGITS_TOL  # bf16 rounding shows, within tolerance
    assert bits["mismatches"] == 0 and bits["compared"] > 0.95 * (bits["compared"] + bits["skipped_within_logit_error"])


def test_a_wrong_sampler_fails_the_exact_check(folder, modules, monkeypatch):
    # a sampler that forgets tau (0.5 in setting B) must change bits: the exact check is not vacuous
    from varbench.harness.core import sampling_bitwise as sb

    def no_tau(logits, guided, t, s, gen, ratio=0.0):
        return sb.sample_bits(logits, guided, t, replace(s, temperature=1.0), gen, ratio)

    variant, run, sampling = _variant(folder, modules, "fp32xattn", EngineConfig("fp32"),
                                      "setting_B_released_default")
    monkeypatch.setattr(variant, "sampler", no_tau)
    checks = conf._free_run_checks(variant, run, sampling, "B", True, 1e-4)
    assert checks[0]["mismatches"] > 1000 and not checks[0]["pass"]


@pytest.mark.slow
def test_the_whole_folder_passes_through_the_command(folder, capsys):
    from varbench.harness.cli import main

    assert main(["conformance", str(folder), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and len(report["checks"]) > 80
