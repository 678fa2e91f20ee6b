"""LiteVAR against the official code's outputs (../shared/conformance/litevar_d2, fp32 CPU; made by
results/conformance/make_litevar_fixture.py from EkaterinaXie/LiteVAR@176ee6a): every token exact in the engine
and reference modes for the masked (mode 1) and masked + CFG-shared (mode 2) runs, the masks identical to the
ones the official code got, and that the check has teeth (the -inf exclusion the port used before fails it)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import CONFORMANCE, need

from varbench.harness.cli import main
from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import SampleConfig
from varbench.variants.accel import apply_acceleration
from varbench.variants.loading import load_var_net, load_vqvae
from varbench.variants.var import VAR, EngineConfig

pytestmark = pytest.mark.usefixtures("one_thread")
RUNS = ("gen_mode2_global_cfg", "gen_mode1_masked")


@pytest.fixture(scope="module")
def folder():
    return need(CONFORMANCE / "litevar_d2")


def test_conformance_command_passes_with_every_token_exact(folder, capsys):
    assert main(["conformance", str(folder), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    checks = {c["check"]: c for c in report["checks"]}
    assert report["passed"] and all(c["pass"] for c in checks.values())
    assert checks["masks.scale9.masked_key_scales"]["got"] == [3, 4, 5, 6, 7, 8, 9]  # 7 masks at the last scale
    assert checks["masks.scale4.masked_key_scales"]["got"] == [2, 3, 4]
    assert sum(name.startswith("masks.") and ".keys" in name for name in checks) == 30  # mask_0 .. mask_29
    for prefix in ("", "engine.", "reference."):
        for run in RUNS:
            assert checks[f"{prefix}{run}.tokens"]["mismatches"] == 0
            assert checks[f"{prefix}{run}.image"]["max_abs_err"] < 1e-4


def test_the_fixture_differs_from_plain_var_where_litevar_acts(folder):
    # the runs are informative only if the official masks and CFG share changed tokens, from where each acts
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["self_check_mode0_equals_var_d2_ar_topk900_topp096"] is True
    shared = torch.load(folder / "gen_mode2_global_cfg.pt", weights_only=True)["tokens_differing_from_mode0_per_scale"]
    masked = torch.load(folder / "gen_mode1_masked.pt", weights_only=True)["tokens_differing_from_mode0_per_scale"]
    assert masked[:3] == [0, 0, 0] and all(d > 0 for d in masked[3:])  # masks start at scale 3
    assert shared[0] == 0 and all(d > 0 for d in shared[2:])  # the shared scores act from the first CFG step on


def test_excluding_masked_keys_fails_the_fixture(folder, monkeypatch):
    # LiteVAR multiplies masked scores by 0 (they keep weight exp(0)); sending them to -inf must break the tokens
    litevar = importlib.import_module("varbench.variants.accel.litevar")  # the module, not its factory
    monkeypatch.setattr(litevar, "_mask_scores", lambda scores, visible: scores.masked_fill(~visible, -torch.inf))
    meta = json.loads((folder / "meta.json").read_text())
    net = load_var_net(folder / meta["var"]["file"], expect_depth=meta["var"]["depth"])
    variant = VAR(net, load_vqvae(folder / meta["vae"]["file"]), EngineConfig("fp32"), torch.device("cpu"))
    apply_acceleration(variant, "litevar", window=meta["litevar"]["window"], share_cfg=False)
    run = torch.load(folder / "gen_mode1_masked.pt", weights_only=True)
    sampling = SampleConfig(cfg=run["cfg"], top_k=run["kwargs"]["top_k"], top_p=run["kwargs"]["top_p"])
    out = generate(variant, run["label_B"], sampling, g_seed=run["g_seed"])
    wrong = [int((a != b).sum()) for a, b in zip(out.tokens, run["idx_Bl_per_scale"])]
    assert wrong[:3] == [0, 0, 0] and sum(wrong) > 100  # the same until the masks start at scale 3
