"""Our modules have exactly the official state-dict layout, parameter counts and FLOPs (VAR_SPEC §3, §6, §7).

The key listings in ../shared/docs/keys were taken from the official code; building our models on the meta
device and comparing names, shapes and dtypes shows that the official checkpoints load strictly.
"""

import pytest
import torch

from conftest import KEYS, need
from varbench.harness.run.bench import vae_decode_flops
from varbench.variants.var import param_count
from varbench.variants.var_model import PATCH_NUMS, VARConfig, VARNet, flops_per_image
from varbench.variants.vqvae import VQVAE, VQVAEConfig, phi_index


def _listing(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = {}
    for line in need(KEYS / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")[:3]
        rows[key] = (tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), dtype)
    return rows


def _ours(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("listing, cfg", [
    ("keys_var_d16.txt", VARConfig(depth=16)),
    ("keys_var_d36_saln_512.txt", VARConfig(depth=36, shared_aln=True, patch_nums=PATCH_NUMS[2240])),
])
def test_var_state_dict_layout_matches_official(listing, cfg):
    with torch.device("meta"):
        net = VARNet(cfg)
    assert _ours(net) == _listing(listing)


def test_vqvae_state_dict_layout_matches_official():
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig())
    assert _ours(vae) == _listing("keys_vqvae.txt")
    assert sum(p.numel() for p in vae.parameters()) == 108_948_355


@pytest.mark.parametrize("depth, params, gflops", [
    (16, 310_283_520, 600.7), (20, 600_917_136, 1150.5), (24, 1_033_399_360, 1963.6), (30, 2_010_020_356, 3790.0)])
def test_param_counts_and_flops_match_spec(depth, params, gflops):
    cfg = VARConfig(depth=depth)
    assert param_count(cfg) == params
    assert flops_per_image(cfg) / 1e9 == pytest.approx(gflops, abs=0.05)


def test_d36_shared_adaln_counts():
    cfg = VARConfig(depth=36, shared_aln=True, patch_nums=PATCH_NUMS[2240])
    assert param_count(cfg) == 2_353_893_904
    assert flops_per_image(cfg) / 1e9 == pytest.approx(22803.7, abs=0.05)


def test_config_is_read_off_a_state_dict():
    with torch.device("meta"):
        sd = VARNet(VARConfig(depth=36, shared_aln=True, patch_nums=PATCH_NUMS[2240])).state_dict()
    cfg = VARConfig.from_state_dict(sd)
    assert (cfg.depth, cfg.width, cfg.heads, cfg.shared_aln, cfg.patch_nums) == (
        36, 2304, 36, True, PATCH_NUMS[2240])


def test_vae_decode_flops_match_spec():
    assert vae_decode_flops(VQVAEConfig(), (1, 32, 16, 16)) / 1e9 == pytest.approx(393.7, abs=0.05)


def test_phi_table_has_the_official_ties():
    assert [phi_index(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
