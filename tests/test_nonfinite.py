"""Non-finite numbers never end in a bare multinomial traceback (issue 13, item 6): bad sampling settings are
refused when the SampleConfig is made, naming the setting and its valid range, and non-finite logits are
caught at the step where they appear, naming the scale and the cause (a setting, or a weight of the model)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from varbench.harness import SampleConfig, create_variant
from varbench.harness.core.loop import generate
from varbench.harness.core.sampling import NonFiniteLogitsError, ScaleSampling, draw_tokens

LABELS = torch.tensor([1, 2])
NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("settings, named, valid", [
    ({"cfg": NAN}, "sampling.cfg = nan", r"\[0, 1000\]"),
    ({"cfg": 1e38}, "sampling.cfg = 1e\\+38", r"\[0, 1000\]"),
    ({"cfg": -INF}, "sampling.cfg = -inf", r"\[0, 1000\]"),
    ({"temperature": NAN}, "sampling.temperature = nan", "temperature > 0"),
    ({"temperature": INF}, "sampling.temperature = inf", "temperature > 0"),
    ({"temperature": -1.0}, "sampling.temperature = -1.0", "temperature > 0"),
    ({"temperature": (1.0, NAN, 1.0)}, r"sampling.temperature\[1\] = nan", "temperature > 0"),
    ({"top_p": NAN}, "sampling.top_p = nan", r"\[0, 1\]"),
    ({"top_p": 1.5}, "sampling.top_p = 1.5", r"\[0, 1\]"),
    ({"top_k": NAN}, "sampling.top_k = nan", "integer >= 0"),
    ({"top_k": 2.5}, "sampling.top_k = 2.5", "integer >= 0"),
    ({"top_k": -1}, "sampling.top_k = -1", "integer >= 0"),
    ({"top_k": ()}, "sampling.top_k is an empty list", "one per scale"),
])
def test_bad_settings_refused_up_front(settings, named, valid):
    with pytest.raises(ValueError, match=f"{named}.*{valid}"):
        SampleConfig(**settings)


def test_valid_settings_still_accepted():
    s = SampleConfig(cfg=0.0, top_k=(0, 600, 900), top_p=1.0, temperature=(1e-3, 1.1, 5.0))
    assert s.at(1) == ScaleSampling(600, 1.0, 1.1, False)
    s.validate(3)


def _poison(variant, module: str, param: str, value: float) -> None:
    with torch.no_grad():
        dict(variant.models[module].net.named_parameters())[param].view(-1)[0] = value


@pytest.mark.parametrize("name, role, param, where", [
    ("test_var", "var_d2", "head.weight", "scale 0 (1x1 tokens)"),
    ("test_var", "var_d2", "pos_start", "scale 0 (1x1 tokens)"),
    ("test_hmar", "hmar_d2", "mask_embed.weight", "scale 1 (2x2 tokens), masked step 1"),  # only masked steps read it
    ("test_code", "refiner", "head.bias", "stream 'refiner'"),  # the drafter's scales run first and are fine
])
def test_nan_weight_named_at_its_step(name, role, param, where):
    variant = create_variant(name)
    _poison(variant, role, param, NAN)
    with pytest.raises(FloatingPointError, match=rf"{re.escape(where)}.*non-finite logits from the model: check the weights "
                                                 rf"\(e.g. a NaN in {param} of {role}\)"):
        generate(variant, LABELS, SampleConfig(), g_seed=0)


def test_inf_weight_named():
    variant = create_variant("test_var")
    _poison(variant, "var_d2", "head.bias", INF)
    with pytest.raises(NonFiniteLogitsError, match=r"an inf in head.bias of var_d2"):
        generate(variant, LABELS, SampleConfig(), g_seed=0)


def test_guidance_overflow_names_cfg_and_scale():
    """Huge but finite logits (every weight finite) overflow under a valid cfg at the first guided scale."""
    variant = create_variant("test_var")
    with torch.no_grad():
        variant.net.head.weight.mul_(1e36)
        variant.net.head.bias.mul_(1e36)
    with pytest.raises(FloatingPointError, match=r"scale 1 \(2x2 tokens\).*sampling.cfg = 1000.0 \(t = 111.1"):
        generate(variant, LABELS, SampleConfig(cfg=1000.0), g_seed=0)


def test_temperature_overflow_names_temperature():
    variant = create_variant("test_var")
    with pytest.raises(FloatingPointError, match=r"scale 0 .*sampling.temperature = 1e-44 made the logits "
                                                 "non-finite"):
        generate(variant, LABELS, SampleConfig(temperature=1e-44, top_k=0, top_p=0.0), g_seed=0)


def test_sampler_alone_names_the_stage():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1, 2] = NAN
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits reached the sampler") as err:
        draw_tokens(logits, ScaleSampling(), None)
    assert err.value.cause == "input"
    with pytest.raises(NonFiniteLogitsError) as err:
        draw_tokens(torch.tensor([[[1.0, 2.0]]]), ScaleSampling(temperature=1e-44), None)
    assert err.value.cause == "temperature"


def test_finite_draws_unchanged():
    """The diagnosis only runs on failure: a normal draw gives the same tokens as torch's own multinomial."""
    logits = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    draw = draw_tokens(logits.clone(), ScaleSampling(top_k=0, top_p=0.0), torch.Generator().manual_seed(3))
    expected = torch.multinomial(logits.softmax(-1).view(-1, 16), 1, True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw.tokens, expected.view(2, 5))
