"""The trainer's HMAR kind (two stages) and CoDe-style refiner (`var` with from_scale / init), tiny preset, CPU."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import SampleConfig
from varbench.harness.train.trainer import TrainConfig, _check_resumable, train
from varbench.kernels import block_causal_ranges, block_sparse_attention
from varbench.harness.train import steps as T
from varbench.variants.hmar import build_hmar, load_hmar_net
from varbench.variants.hmar_model import HMARNet
from varbench.variants.var_model import VARNet
from varbench.variants.vqvae import VQVAE

SMALL = dict(preset="tiny", threads=1, num_train=128, num_heldout=60, progress=False, log_every=1, ckpt_every=1000)
PN = T.TINY.patch_nums  # (1, 2, 3, 4, 5, 6, 8): L = 155
# A mask schedule for the zoo's scales (the official 256 px one has no 155-token entry): masked steps at 2x2, 3x3.
ZOO_SCHEDULE = [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64]]


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _tiny_vqvae(seed: int = 0) -> VQVAE:
    """The tokenizer a run without `vqvae` uses (seed + 1), as `harness.train_tasks` builds it."""
    return T.init_vqvae_(VQVAE(T.TINY.vqvae), torch.Generator().manual_seed(seed + 1)).eval()


def _tokens(vae: VQVAE, n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    images = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return vae.encode_tokens(T.images_to_tensor(images), PN)


def test_lognormal_weights_reproduce_the_published_256px_values():
    w = T.lognormal_scale_weights((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    published = torch.tensor([0.025, 0.064, 0.115, 0.138, 0.140, 0.133, 0.121, 0.105, 0.088, 0.071])  # VARIANTS §4.3
    assert (w - published).abs().max() < 6e-4 and w.sum().item() == pytest.approx(1.0)
    tw = T.token_weights(PN)
    assert tw.shape == (155,) and tw.sum().item() == pytest.approx(1.0)
    assert tw[-64:].sum().item() == pytest.approx(T.lognormal_scale_weights(PN)[-1].item())  # spread evenly
    assert torch.allclose(T.token_weights(PN, "uniform"), torch.full((155,), 1 / 155))


def test_mask_positions_are_ceil_pn2_p_per_scale_shared_by_the_batch():
    gen = torch.Generator().manual_seed(0)
    for p in (0.3, 0.999, 1e-9):
        pos = T.draw_mask_positions(PN, gen, p)
        begin = 0
        for pn in PN[1:]:
            inside = pos[(pos >= begin) & (pos < begin + pn * pn)]
            assert len(inside) == max(1, math.ceil(pn * pn * p)) == len(inside.unique())
            begin += pn * pn
        assert len(pos) == len(pos.unique()) and int(pos.max()) < 154  # indices into the L−1 inputs


def test_from_scale_loss_is_the_ce_of_the_later_scales_only():
    vae, net = _tiny_vqvae(), T.init_var_(VARNet(T.var_config("tiny", 1)), torch.Generator().manual_seed(0))
    tokens, labels = _tokens(vae), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        logits = net(labels, vae.tokens_to_var_input(tokens, PN))
    target = torch.cat(tokens, dim=1)
    for si, (begin, _) in enumerate(net.begin_ends):
        loss, metrics = T.var_step(net, vae, tokens, labels, 0.0, None, from_scale=si)
        direct = F.cross_entropy(logits[:, begin:].reshape(-1, 64), target[:, begin:].reshape(-1))
        assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
        if si:
            assert metrics["ce_all"] == pytest.approx(F.cross_entropy(logits.reshape(-1, 64), target.reshape(-1)).item())
    # from_scale = S−1: the head bias's gradient is the closed form of CE on the last scale's 64 tokens alone,
    # mean(softmax − one-hot) over them, so no earlier position reaches the loss.
    last = net.begin_ends[-1][0]
    net.zero_grad()
    T.var_step(net, vae, tokens, labels, 0.0, None, from_scale=len(PN) - 1)[0].backward()
    expected = (logits[:, last:].softmax(-1) - F.one_hot(target[:, last:], 64)).mean(dim=(0, 1))
    torch.testing.assert_close(net.head.bias.grad, expected, rtol=1e-4, atol=1e-7)


def test_var_state_dict_maps_onto_the_hmar_next_scale_path():
    """HMAR_SPEC §2: a VAR is HMAR's base + ns path; run with VAR's block-causal pattern it gives VAR's logits."""
    vae = _tiny_vqvae()
    var = T.init_var_(VARNet(T.var_config("tiny", 2)), torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in var.parameters():  # break init symmetries (zero biases, equal logit scales) so the mapping matters
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    hmar = HMARNet(T.hmar_config("tiny", 2))
    hmar.load_state_dict(T.hmar_state_from_var(var.state_dict(), hmar), strict=True)
    assert torch.equal(hmar.attn_bias_for_masking, HMARNet(T.hmar_config("tiny", 2)).attn_bias_for_masking)
    tokens, labels = _tokens(vae, 2), torch.tensor([1, 10])
    with torch.no_grad():
        x_in = vae.tokens_to_var_input(tokens, PN)
        cond = hmar.class_emb(labels)
        x = torch.cat((cond.unsqueeze(1) + hmar.pos_start, hmar.embed(x_in) + hmar.word_embed_bias), 1)
        start, end = block_causal_ranges(PN)
        causal = hmar.run(x + hmar.level_pos(), hmar.modulations(cond), "ns",
                          attend=lambda q, k, v: block_sparse_attention(q, k, v, start, end, 1.0, impl="ref")[0])
        torch.testing.assert_close(causal, var(labels, x_in), rtol=1e-5, atol=1e-5)


def test_hmar_two_stages_train_load_strictly_and_sample(tmp_path):
    common = dict(SMALL, depth=2, batch_size=16)
    s1 = train(TrainConfig("hmar", str(tmp_path / "h1"), steps=12, lr=3e-3, **common))
    loss1 = _losses(tmp_path / "h1")
    assert _mean(loss1[-4:]) < _mean(loss1[:4]) - 0.5  # log-normal weighted CE, starts at ln 64 = 4.16
    assert s1["heldout_ce"] < math.log(64) - 0.3 and s1["stage"] == 1

    s2 = train(TrainConfig("hmar", str(tmp_path / "h2"), steps=30, lr=1e-2, stage=2,
                           init=str(tmp_path / "h1" / "model.pt"), **common))
    loss2 = _losses(tmp_path / "h2")  # CE at the masked positions; p ~ U(0, 1) per step makes it noisy
    assert _mean(loss2[-5:]) < _mean(loss2[:5]) - 0.1
    assert s2["heldout_ce"] == pytest.approx(s1["heldout_ce"])  # stage 2 leaves the next-scale path alone
    assert s2["heldout_mask_ce"] < s2["heldout_ns_ce_masked"]  # seeing the unmasked tokens of the scale helps

    a, b = torch.load(tmp_path / "h1" / "model.pt"), torch.load(tmp_path / "h2" / "model.pt")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(("mask_blocks.", "mask_head", "mask_embed.")) for k in changed)

    vae_file = tmp_path / "vae.pt"
    torch.save(_tiny_vqvae().state_dict(), vae_file)
    net = load_hmar_net(tmp_path / "h2" / "model.pt")  # the variant's strict loader
    assert net.cfg == T.hmar_config("tiny", 2) and net.cfg.n_layers_train == 1
    variant = build_hmar(2, weights=str(tmp_path / "h2" / "model.pt"), vae=str(vae_file),
                         mask_schedule=ZOO_SCHEDULE)
    assert len(variant.steps()) == 7 + 1 + 3
    out = generate(variant, torch.tensor([2, 7]), SampleConfig(cfg=1.5, top_k=20, top_p=0.9), g_seed=0)
    assert [t.shape for t in out.tokens] == [(2, p * p) for p in PN]
    assert out.images.shape == (2, 3, 64, 64) and bool(torch.isfinite(out.images).all())


def test_refiner_fine_tunes_a_trained_var_on_the_later_scales(tmp_path):
    common = dict(SMALL, depth=1, batch_size=16, lr=3e-3)
    train(TrainConfig("var", str(tmp_path / "base"), steps=12, **common))
    init = str(tmp_path / "base" / "model.pt")
    scratch = train(TrainConfig("var", str(tmp_path / "scratch"), steps=16, from_scale=5, **common))
    refiner = train(TrainConfig("var", str(tmp_path / "ref"), steps=16, from_scale=5, init=init, **common))
    from_scratch, tuned = _losses(tmp_path / "scratch"), _losses(tmp_path / "ref")
    assert _mean(from_scratch[-4:]) < _mean(from_scratch[:4]) - 0.1
    assert tuned[0] < from_scratch[0] - 0.1  # the first loss is the initial VAR's: the init was used
    assert _mean(tuned[-4:]) < tuned[0]
    assert refiner["heldout_ce_from_scale"] < scratch["heldout_ce_from_scale"]
    assert refiner["init"] == init and refiner["from_scale"] == 5


def test_new_settings_are_checked_and_take_part_in_resume():
    with pytest.raises(ValueError, match="stage 2 starts from a trained stage-1 model"):
        TrainConfig("hmar", "unused", steps=1, stage=2)
    with pytest.raises(ValueError, match="from_scale applies to kind var only"):
        TrainConfig("hmar", "unused", steps=1, from_scale=2)
    with pytest.raises(ValueError, match="scale_weights"):
        TrainConfig("hmar", "unused", steps=1, scale_weights="normal")
    cfg = TrainConfig("var", "unused", steps=10, from_scale=3, init="base.pt")
    old = {k: v for k, v in asdict(TrainConfig("var", "unused", steps=10)).items()
           if k not in ("init", "from_scale", "stage", "scale_weights")}
    _check_resumable(old, TrainConfig("var", "unused", steps=10))  # a checkpoint older than the new settings
    with pytest.raises(ValueError, match="from_scale: checkpoint 0 vs now 3"):
        _check_resumable(old, cfg)
    with pytest.raises(ValueError, match="init"):
        _check_resumable(asdict(cfg), TrainConfig("var", "unused", steps=10, from_scale=3, init="other.pt"))
