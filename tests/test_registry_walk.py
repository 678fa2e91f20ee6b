"""Registry-driven tests: every registered test_* variant generates through the one loop with every KV policy that
applies to it (and refuses the ones that do not, naming the policy and saying it has no KV cache); every
registered name's `varbench list` parameter count equals an independent count of its network(s) built on the meta
device; every per-depth HMAR sampling preset is the `default_sampling` of the variant of that depth.

The collections are read from the registries at collection time, so a newly registered test_* variant or KV
policy is covered without editing this file."""

from __future__ import annotations

import pytest
import torch

import varbench.variants  # noqa: F401  (registers the built-in variants and KV policies)
from varbench.harness import SampleConfig, generate
from varbench.harness.core.registry import KV_POLICIES, VARIANTS, create_variant
from varbench.variants import describe
from varbench.variants.hmar import HMAR_SAMPLING
from varbench.variants.hmar_model import HMARConfig, HMARNet
from varbench.variants.infinity_model import InfinityConfig, InfinityNet
from varbench.variants.llamagen_model import LlamaGenConfig, LlamaGenNet
from varbench.variants.var_model import VARConfig, VARNet

TEST_VARIANTS = VARIANTS.list("test_*")
POLICIES = KV_POLICIES.list()
LABELS = torch.arange(2)  # batch 2: the calibrating policies (scalekv, hack) stay cheap on the tiny models

# Per-policy arguments. The registered defaults (budget 0.1 of the 680-token schedule = 68 tokens per layer and
# head) are kept, since they exceed the 32-query observation window of snapkv/pyramidkv and scalekv's 16; a
# variant with a shorter schedule would need an explicit token budget here (a budget under the window is refused).
KV_ARGS: dict[str, dict] = {name: {} for name in POLICIES}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models are latency-bound


def _applies(variant: str, policy) -> bool:
    """A compressing policy needs a KV cache to compress; `full` applies to every variant."""
    return getattr(VARIANTS.get(variant), "has_kv_cache", True) or not getattr(policy, "compresses", False)


@pytest.fixture(scope="module")
def plain() -> dict:
    """Each test_* variant built with no kv_policy, and its tokens, filled lazily: name -> (variant, tokens)."""
    return {}


def _plain(name: str, cache: dict):
    if name not in cache:
        variant = create_variant(name)
        cache[name] = variant, generate(variant, LABELS, SampleConfig(), g_seed=0).tokens
    return cache[name]


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_variant_generates_with_policy(name, policy_name, plain):
    policy = KV_POLICIES.get(policy_name)(**KV_ARGS[policy_name])
    if not _applies(name, policy):
        with pytest.raises(ValueError, match="no KV cache") as err:
            create_variant(name, kv_policy=policy)
        assert repr(policy_name) in str(err.value)  # names the policy it refuses
        return
    if getattr(policy, "needs_calibration", False):
        # Calibrated beforehand on the same models (same architecture and seed, so the same model key) over 2
        # labels: building with the policy would otherwise calibrate on 10 labels, 5x the cost on 2 CPUs.
        policy.calibrate(_plain(name, plain)[0], labels=LABELS)
    variant = create_variant(name, kv_policy=policy)
    out = generate(variant, LABELS, SampleConfig(), g_seed=0)
    assert out.images.ndim == 4 and out.images.shape[:2] == (2, 3), out.images.shape
    assert out.images.shape[2] == out.images.shape[3] and out.images.shape[2] % variant.patch_nums[-1] == 0
    assert torch.isfinite(out.images).all()
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert [t.shape for t in out.tokens] == [(2, pn * pn) for pn in variant.patch_nums]
    if policy_name == "full":
        ref = _plain(name, plain)[1]
        assert all(torch.equal(a, b) for a, b in zip(out.tokens, ref, strict=True))


# -- parameter counts --------------------------------------------------------------------------------------------

_NETS = {VARConfig: VARNet, HMARConfig: HMARNet, LlamaGenConfig: LlamaGenNet, InfinityConfig: InfinityNet}


def _meta_count(cfg) -> int:
    """Independent of varbench.variants.params: build the network on the meta device and sum the numels."""
    with torch.device("meta"):
        net = _NETS[type(cfg)](cfg)
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", VARIANTS.list())
def test_listed_parameter_count_is_exact(name):
    cfg = getattr(VARIANTS.get(name), "config", None)
    if cfg is None:
        pytest.skip(f"{name}'s factory carries no .config, so `varbench list` cannot count it")
    cfgs = cfg if isinstance(cfg, tuple) else (cfg,)  # CoDe: drafter and refiner
    assert describe(name)["params"] == f"{sum(map(_meta_count, cfgs)):,}"


# Exact counts stated elsewhere: VAR-d16's transformer (also asserted by test_cli), and the HMAR checkpoints'
# parameter counts quoted in variants/hmar.py's docstrings (hmar-d*.pth). No other exact count is published here.
KNOWN = {"var_d16": "310,283,520", "hmar_d16": "467,691,904", "hmar_d20": "845,517,872",
         "hmar_d24": "1,384,328,960", "hmar_d30": "2,556,324,212",
         # LlamaGen's GPTs (README @ce98ec41 rounds them to 111M, 343M, 775M, 1.4B, 3.1B)
         "llamagen_b": "110,888,448", "llamagen_l": "342,910,976", "llamagen_xl": "774,699,520",
         "llamagen_xxl": "1,410,972,672", "llamagen_3b": "3,096,659,200",
         # Infinity's transformers (issue 14; the released checkpoints' key listings give the shapes)
         "infinity_2b": "2,204,564,032", "infinity_8b": "8,375,791,824"}


@pytest.mark.parametrize("name, count", KNOWN.items())
def test_known_parameter_counts(name, count):
    assert describe(name)["params"] == count


# -- sampling presets ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", sorted(HMAR_SAMPLING))
def test_hmar_preset_is_the_variant_default(depth, monkeypatch):
    """build_hmar assigns HMAR_SAMPLING[depth]; building the real network (465M-2.4B parameters) on CPU is too
    slow, so the registered factory is run with the network built on the meta device and a tiny random VQVAE."""
    from varbench.variants import hmar

    real = hmar.HMARNet
    monkeypatch.setattr(hmar, "init_random_hmar_", lambda net, gen: net)
    monkeypatch.setattr(hmar, "HMARNet", lambda cfg: _meta(real, cfg))  # a zero-cost network: no weights
    variant = VARIANTS.get(f"hmar_d{depth}")(weights="random", vae_ch=32, device="meta")
    assert variant.default_sampling == HMAR_SAMPLING[depth]


def _meta(cls, cfg):
    """The network `cls(cfg)` on the meta device (shapes only)."""
    with torch.device("meta"):
        return cls(cfg)


def test_code_preset_is_the_official_pairs_default(monkeypatch):
    """code_d30_d16 samples with CODE_SAMPLING; the d30 + d16 pair is built small (test_code's) to check it."""
    from varbench.variants import code

    small = VARIANTS.get("test_code")()
    assert small.default_sampling is None  # random test models: the study's sampling
    monkeypatch.setattr(code, "build_code", lambda *a, **kw: small)
    assert VARIANTS.get("code_d30_d16")().default_sampling == code.CODE_SAMPLING
