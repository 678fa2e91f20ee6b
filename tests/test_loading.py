"""Checkpoint sources and the errors a user sees for a wrong, broken or foreign file."""

import pytest
import torch

from varbench.harness.core.checkpoints import CheckpointError, read_state_dict, resolve_source
from varbench.variants.loading import load_var_net, load_vqvae, random_var_net, random_vqvae
from varbench.variants.var_model import VARConfig
from varbench.variants.vqvae import VQVAEConfig


@pytest.fixture(scope="module")
def d2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "var_d2.pth"
    torch.save(random_var_net(VARConfig(depth=2)).state_dict(), path)
    return path


def test_loads_strictly_and_reads_the_architecture(d2_file):
    net = load_var_net(d2_file, expect_depth=2)
    assert (net.cfg.depth, net.cfg.width, net.cfg.heads) == (2, 128, 2)
    want = torch.load(d2_file, weights_only=True)
    assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())


def test_wrong_depth_names_both_depths(d2_file):
    with pytest.raises(CheckpointError, match=r"depth-2 VAR .*depth-16 model was asked for.*var_d2"):
        load_var_net(d2_file, expect_depth=16)


def test_truncated_file_is_named(d2_file, tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(d2_file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"broken.pth is a damaged PyTorch checkpoint \(truncated"):
        load_var_net(broken)


def test_vqvae_file_given_as_var_says_what_it_is(tmp_path):
    path = tmp_path / "vae.pth"
    torch.save(random_vqvae(VQVAEConfig(ch=32)).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a VAR state dict: it looks like a VQVAE"):
        load_var_net(path)
    assert load_vqvae(path).cfg.ch == 32


def test_foreign_state_dict_is_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1), "fc.bias": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a VAR state dict.*first keys: conv1.weight"):
        load_var_net(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        read_state_dict(path)


def test_shape_and_key_differences_are_listed(d2_file, tmp_path):
    sd = torch.load(d2_file, weights_only=True)
    sd["head.bias"] = torch.zeros(7)
    del sd["blocks.1.ffn.fc2.bias"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_var_net(path)
    text = str(err.value)
    assert "missing keys (1): blocks.1.ffn.fc2.bias" in text
    assert "unexpected keys (1): extra.weight" in text
    assert "head.bias: file (7,) vs model (4096,)" in text


def test_missing_file_and_uncached_hub_file(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        resolve_source(tmp_path / "nope.pth")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"var_d16.pth is not in the local Hugging Face cache.*"
                                              r"huggingface.co/FoundationVision/var/resolve/main/var_d16.pth"):
        resolve_source("var_d16", allow_download=False)


def test_hub_file_is_served_from_the_local_cache(d2_file, tmp_path, monkeypatch):
    # The layout huggingface_hub reads offline: models--OWNER--REPO/{refs/main, snapshots/<rev>/FILE}.
    repo = tmp_path / "hub" / "models--someone--tiny-var"
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "snapshots" / rev / "var_d2.pth").write_bytes(d2_file.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    net = load_var_net("hf:someone/tiny-var/var_d2.pth", expect_depth=2, allow_download=False)
    assert net.cfg.depth == 2


class _RunsCode:
    """Unpickling this calls a function: what a malicious checkpoint does."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


@pytest.mark.parametrize("content, message", [
    (lambda path: path.write_bytes(bytes(range(256)) * 8), r"random.pth is not a PyTorch checkpoint \(neither"),
    (lambda path: torch.save({"w": torch.zeros(2), "x": _RunsCode()}, path),
     r"code.pth holds Python objects besides tensors .*GLOBAL .*print.*could run code"),
], ids=["random", "code"])
def test_unloadable_file_says_what_it_is_and_never_suggests_unsafe_loading(tmp_path, content, message):
    name = "random" if "random" in message else "code"
    path = tmp_path / f"{name}.pth"
    content(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_var_net(path)
    assert "weights_only" not in str(info.value) and "truncated" not in str(info.value)
