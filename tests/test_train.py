"""The zoo trainer: losses fall, resume is exact, exported weights load strictly (tiny preset, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from varbench.harness.eval.extractors import ProjectCNN
from varbench.harness.train import TrainConfig, lr_factor, train
from varbench.harness.train import steps as T
from varbench.variants.loading import load_var_net, load_vqvae
from varbench.variants.vqvae import VQVAE

SMALL = dict(preset="tiny", threads=1, num_train=128, num_heldout=60, progress=False, log_every=1, ckpt_every=1000)


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _mean(entries: list[dict], key: str = "loss") -> float:
    return sum(e[key] for e in entries) / len(entries)


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig("var", "unused", steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    lin = TrainConfig("var", "unused", steps=100, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(50, lin) == pytest.approx(0.5)


def test_quantize_train_matches_inference_tokens():
    torch.manual_seed(0)
    vae = T.init_vqvae_(VQVAE(T.TINY.vqvae), torch.Generator().manual_seed(0)).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    pn = T.TINY.patch_nums
    f = vae.quant_conv(vae.encoder(x))
    f_hat, vq, tokens = T.quantize_train(vae, f, pn)
    ref = vae.encode_tokens(x, pn)
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref))
    torch.testing.assert_close(f_hat, vae.tokens_to_fhat(ref, pn), rtol=1e-5, atol=1e-5)
    assert vq.item() > 0


def test_var_trains_resumes_exactly_and_loads_strictly(tmp_path):
    common = dict(SMALL, depth=1, steps=14, batch_size=16, lr=3e-3)
    full = tmp_path / "full"
    train(TrainConfig("var", str(full), **common))
    log = _log(full)
    assert len(log) == 14
    assert _mean(log[-4:]) < _mean(log[:4]) - 0.05  # starts at ln(64) = 4.16

    part = tmp_path / "part"
    s1 = train(TrainConfig("var", str(part), stop_at=6, **common))
    assert not s1["finished"] and s1["step"] == 6
    s2 = train(TrainConfig("var", str(part), **common), resume=True)
    assert s2["finished"] and s2["steps_this_run"] == 8
    assert [e["loss"] for e in _log(part)] == [e["loss"] for e in log]
    a, b = torch.load(full / "model.pt"), torch.load(part / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    net = load_var_net(part / "model.pt")  # official names: the strict loader reads it
    assert net.cfg == T.var_config("tiny", 1)
    assert s2["heldout_ce"] < math.log(64)

    with pytest.raises(ValueError, match="lr"):
        train(TrainConfig("var", str(part), **dict(common, lr=1e-4)), resume=True)


def test_vqvae_loss_falls_resumes_and_loads(tmp_path):
    common = dict(SMALL, steps=10, batch_size=8, lr=3e-3)
    full = tmp_path / "full"
    summary = train(TrainConfig("vqvae", str(full), **common))
    log = _log(full)
    assert _mean(log[-3:]) < _mean(log[:3])
    assert summary["heldout_mse"] < 1.0 and 0 < summary["code_usage"] <= 1

    part = tmp_path / "part"
    train(TrainConfig("vqvae", str(part), stop_at=4, **common))
    train(TrainConfig("vqvae", str(part), **common), resume=True)
    assert [e["loss"] for e in _log(part)] == [e["loss"] for e in log]

    vae = load_vqvae(part / "model.pt")
    assert vae.cfg == T.TINY.vqvae
    ref = torch.load(full / "model.pt")
    assert all(torch.equal(v, ref[k]) for k, v in vae.state_dict().items())


def test_classifier_beats_chance_on_heldout(tmp_path):
    out = tmp_path / "cls"
    summary = train(TrainConfig("classifier", str(out), **dict(SMALL, steps=24, batch_size=16, num_heldout=100)))
    log = _log(out)
    assert _mean(log[-4:]) < _mean(log[:4])
    assert summary["heldout_acc"] > 0.2  # chance is 0.1
    model = ProjectCNN.load(str(out / "model.pt"))
    assert model.num_classes == 10


def test_zoo_budget_under_50mb():
    b = T.zoo_budget()
    assert b["fp16_bytes"] < 50e6
    assert set(b) >= {"vqvae", "classifier", *(f"var_d{d}" for d in T.ZOO_VAR_DEPTHS)}
