"""The sampler on hand-computable cases: top-k ties, top-p edges, temperature order, CFG ramp."""

import math

import pytest
import torch

from varbench.harness.core.loop import Step
from varbench.harness.core.sampling import SampleConfig, ScaleSampling, draw_tokens, filter_top_k_top_p_, guide


def _kept(row: list[float], k: int = 0, p: float = 0.0) -> list[int]:
    logits = torch.tensor([[row]])
    filter_top_k_top_p_(logits, k, p)
    return torch.isfinite(logits[0, 0]).nonzero().flatten().tolist()


def test_top_k_keeps_ties_at_the_threshold():
    assert _kept([1.0, 3.0, 2.0, 2.0, 0.0], k=2) == [1, 2, 3]  # 3 survive: the 2nd largest is tied
    assert _kept([1.0, 3.0, 2.0, 2.0, 0.0], k=1) == [1]
    assert _kept([1.0, 1.0, 1.0], k=1) == [0, 1, 2]
    assert _kept([1.0, 3.0, 2.0], k=3) == _kept([1.0, 3.0, 2.0], k=900) == [0, 1, 2]  # k >= vocab keeps all


def test_top_p_removes_the_tail_whose_mass_is_at_most_1_minus_p():
    # probabilities 0.1, 0.2, 0.3, 0.4 (ascending cumsum 0.1, 0.3, 0.6, 1.0)
    row = [math.log(x) for x in (0.1, 0.2, 0.3, 0.4)]
    assert _kept(row, p=0.75) == [1, 2, 3]  # 1 - p = 0.25: only the 0.1 tail goes
    assert _kept(row, p=0.65) == [2, 3]  # 0.35: 0.1 and 0.1 + 0.2 go
    assert _kept(row, p=0.35) == [3]  # 0.65: everything but the largest
    assert _kept(row, p=1.0) == [0, 1, 2, 3]


def test_top_p_never_removes_the_most_likely_token():
    assert _kept([0.0, 10.0, 0.0], p=1e-6) == [1]
    assert _kept([5.0, 5.0], p=1e-6) != []


def test_top_k_then_top_p_renormalises_over_the_survivors():
    # after top-2 the two survivors have equal mass 0.5 each, so top_p = 0.4 keeps just one of them
    assert len(_kept([0.0, 4.0, 4.0, 1.0], k=2, p=0.4)) == 1


def test_greedy_is_argmax_and_consumes_the_stream_by_shape():
    logits = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draw = draw_tokens(logits.clone(), ScaleSampling(top_k=1), g1)
    assert torch.equal(draw.tokens, logits.argmax(-1))
    torch.multinomial(torch.ones(10, 50), 1, generator=g2)  # the same number of rows draws the same amount
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_temperature_divides_after_filtering():
    # Top-p on untempered logits keeps {1, 2}; a temperature that flattened first would keep all three.
    row = torch.tensor([[[0.0, 3.0, 3.2]]])
    draw = draw_tokens(row.clone(), ScaleSampling(top_p=0.9, temperature=100.0), torch.Generator().manual_seed(0))
    assert draw.logits[0, 0, 0] == -math.inf and torch.isfinite(draw.logits[0, 0, 1:]).all()
    counts = torch.zeros(3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(400):
        counts[draw_tokens(row.clone(), ScaleSampling(top_p=0.9, temperature=100.0), gen).tokens[0, 0]] += 1
    assert counts[0] == 0 and abs(counts[1] - counts[2]) < 80  # near-uniform over the survivors


def test_cfg_guidance_formula_and_linear_ramp():
    cond, uncond = torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[1.0, 1.0]]])
    both = torch.cat([cond, uncond])
    assert torch.equal(guide(both, 0.0), cond)
    assert torch.allclose(guide(both, 1.5), torch.tensor([[[3.5, -1.5]]]))  # (1+t)c - t u
    from varbench.variants.var import VAR
    ratios = [s.cfg_ratio for s in VAR.steps(type("V", (), {"patch_nums": (1, 2, 3, 4)})())]
    assert ratios == [0.0, 1 / 3, 2 / 3, 1.0] and isinstance(Step(0), Step)


def test_per_scale_settings_and_validation():
    s = SampleConfig(top_k=[600] * 3, temperature=(1.1, 1.1, 1.0))
    assert s.at(2) == ScaleSampling(600, 0.96, 1.0, False)
    with pytest.raises(ValueError, match="sampling.top_k has 3 values but the model has 10 scales"):
        s.validate(10)
    with pytest.raises(ValueError, match="temperature > 0"):
        SampleConfig(temperature=0.0).validate(1)
