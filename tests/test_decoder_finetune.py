"""`varbench train vqvae-decoder`: fine-tunes only the decoder path, so the tokens (and every VAR trained on them)
stay valid; the shipped zoo's VQVAE is such a fine-tune of the original one (issue 13, item 1)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from varbench.harness.cli import main as cli
from varbench.harness.eval.synthetic import make_dataset
from varbench.harness.train import TrainConfig, train
from varbench.harness.train import steps as T
from varbench.harness.train.decoder import TRAINED_PREFIXES, decoder_loss, frozen_sha256
from varbench.harness.train.tasks import HELDOUT_START
from varbench.variants import zoo
from varbench.variants.loading import load_vqvae
from varbench.variants.vqvae import VQVAE

SMALL = dict(preset="tiny", threads=1, num_train=64, num_heldout=16, progress=False, log_every=1, ckpt_every=1000)
# Tokens of the first 16 held-out images (seed 0, HELDOUT_START..) under the zoo's ORIGINAL VQVAE (sha256
# e69bffeec95a…, before the decoder fine-tune), all scales concatenated as int64: the fine-tune must keep them.
ORIGINAL_ZOO_TOKENS_SHA256 = "180d605da21d5ac40106060bb94037b19eb2de70df2a313e03c8e19cd8bb8e0b"


@pytest.fixture(scope="module")
def tiny_vqvae(tmp_path_factory) -> str:
    """A seeded tiny-preset tokenizer saved as a model.pt (its decoder is untrained, so the loss has room)."""
    path = tmp_path_factory.mktemp("vqvae") / "model.pt"
    vae = T.init_vqvae_(VQVAE(T.TINY.vqvae), torch.Generator().manual_seed(3))
    torch.save(vae.state_dict(), path)
    return str(path)


def _heldout_tokens(vae: VQVAE, n: int = 16) -> torch.Tensor:
    images, _ = make_dataset(n, seed=0, start=HELDOUT_START)
    with torch.no_grad():
        return torch.cat(vae.encode_tokens(T.images_to_tensor(torch.from_numpy(images)), T.ZOO_PATCH_NUMS), dim=1)


def test_decoder_loss_is_zero_only_for_a_perfect_decode_and_counts_edges():
    vae = T.init_vqvae_(VQVAE(T.TINY.vqvae), torch.Generator().manual_seed(0))
    f_hat = torch.randn(2, T.TINY.vqvae.z_channels, 8, 8)
    with torch.no_grad():
        target = vae.decoder(vae.post_quant_conv(f_hat))
        zero, parts = decoder_loss(vae, f_hat, target)
        assert zero.item() == pytest.approx(0.0, abs=1e-6)
        shifted, parts = decoder_loss(vae, f_hat, target + 0.1)  # a constant offset: L1 0.1, MSE 0.01, no edges
    assert parts["l1"] == pytest.approx(0.1, rel=1e-4) and parts["mse"] == pytest.approx(0.01, rel=1e-3)
    assert parts["edge"] == pytest.approx(0.0, abs=1e-6) and shifted.item() == pytest.approx(0.11, rel=1e-3)


def test_fine_tune_keeps_the_tokens_bit_identical_and_learns(tiny_vqvae, tmp_path):
    out = tmp_path / "dec"
    summary = train(TrainConfig("vqvae-decoder", str(out), steps=10, batch_size=8, lr=3e-3, vqvae=tiny_vqvae,
                                **SMALL))
    before, after = load_vqvae(tiny_vqvae), load_vqvae(out / "model.pt")
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed and all(k.startswith(TRAINED_PREFIXES) for k in changed)
    assert frozen_sha256(after) == frozen_sha256(before) == summary["frozen_sha256"]
    assert torch.equal(_heldout_tokens(before), _heldout_tokens(after))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(e["loss"] for e in log[-3:]) < sum(e["loss"] for e in log[:3]) - 0.05
    assert summary["heldout_psnr"] > 0 and summary["heldout_mse"] < 4


def test_fine_tune_resumes_exactly(tiny_vqvae, tmp_path):
    common = dict(SMALL, steps=6, batch_size=4, vqvae=tiny_vqvae)
    full, part = tmp_path / "full", tmp_path / "part"
    train(TrainConfig("vqvae-decoder", str(full), **common))
    train(TrainConfig("vqvae-decoder", str(part), stop_at=3, **common))
    train(TrainConfig("vqvae-decoder", str(part), **common), resume=True)
    assert (full / "log.jsonl").read_text().count("\n") == 6
    losses = [[json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
              for run in (full, part)]
    assert losses[0] == losses[1]


def test_command_requires_a_trained_tokenizer(tmp_path, capsys):
    tiny = ["--preset", "tiny", "--steps", "1", "--num-train", "8", "--num-heldout", "4"]
    with pytest.raises(SystemExit) as err:
        cli(["train", "vqvae-decoder", "--out", str(tmp_path / "run"), *tiny])
    assert err.value.code == 2 and "vqvae-decoder fine-tunes a trained tokenizer's decoder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pass vqvae"):
        TrainConfig("vqvae-decoder", str(tmp_path), steps=1)


SHIPPED = zoo.ZOO_DIR / zoo.MANIFEST
shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason="no zoo in this checkout (varbench train zoo --export)")


@shipped
def test_shipped_vqvae_is_a_decoder_fine_tune_with_the_original_tokens():
    entry = zoo.manifest(zoo.ZOO_DIR)["models"]["vqvae"]
    finetune = entry.get("finetune")
    if finetune is None:
        pytest.skip("the shipped VQVAE is the original (no decoder fine-tune recorded in the manifest)")
    vae = load_vqvae(zoo.zoo_file("vqvae", zoo.ZOO_DIR)).float().eval()
    assert frozen_sha256(vae) == finetune["frozen_sha256"]  # recorded from the original file
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the digest above was computed single-threaded
    try:
        tokens = _heldout_tokens(vae)
    finally:
        torch.set_num_threads(threads)
    assert hashlib.sha256(tokens.numpy().tobytes()).hexdigest() == ORIGINAL_ZOO_TOKENS_SHA256
    before, after = finetune["before"], entry["heldout"]
    assert after["heldout_psnr"] > before["heldout_psnr"] + 0.8 and after["heldout_mse"] < before["heldout_mse"]
