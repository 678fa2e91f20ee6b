"""The speculative verify step (harness/core/sampling_verify.py): closed-form acceptance cases, the documented
random-stream order, and the defining property that the verified token is distributed as p
(Leviathan et al., arXiv:2211.17192, Appendix A.1)."""

import math

import pytest
import torch
from varbench.harness.core.sampling import NonFiniteLogitsError
from varbench.harness.core.sampling_verify import verify_drafts


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(p: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is p (-inf where p is 0)."""
    return p.log()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_p_and_q_accept_every_draft(seed):
    b, n, v = 64, 5, 7
    g = _gen(seed)
    p = torch.randn(b, n, v, generator=g).softmax(-1)
    drafts = torch.multinomial(p.view(-1, v), 1, generator=g).view(b, n)
    out = verify_drafts(_logits(p), p, drafts, _gen(seed + 100))
    assert out.accepted.tolist() == [n] * b
    assert out.n_new.tolist() == [n] * b
    assert torch.equal(out.tokens, drafts)
    assert bool(out.valid.all())


def test_draft_that_p_forbids_is_rejected_and_replaced_from_p():
    b, v = 20_000, 4
    p = torch.tensor([0.0, 0.2, 0.3, 0.5])
    q = torch.tensor([1.0, 0.0, 0.0, 0.0])  # all mass on token 0, which p gives 0
    out = verify_drafts(_logits(p).expand(b, 1, v), q.expand(b, 1, v), torch.zeros(b, 1, dtype=torch.int64),
                        _gen(0))
    assert out.accepted.tolist() == [0] * b
    assert out.n_new.tolist() == [1] * b
    assert torch.equal(out.tokens[:, 0], out.replacement)
    freq = torch.bincount(out.tokens[:, 0], minlength=v).double() / b  # residual max(0, p - q) = p here
    se = (p.double() * (1 - p.double()) / b).sqrt()
    assert freq[0] == 0
    assert bool(((freq - p.double()).abs() <= 4 * se + 1e-12).all()), (freq, p)


def test_output_distribution_is_p():
    """The defining property: draft from q, verify, and the first token is distributed as p."""
    b, v = 200_000, 4
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    drafts = torch.multinomial(q.float().expand(b, v), 1, replacement=True, generator=_gen(1))  # (B, 1)
    out = verify_drafts(_logits(p.float()).expand(b, 1, v), q.float().expand(b, 1, v), drafts, _gen(2))
    se = (p * (1 - p) / b).sqrt()
    freq = torch.bincount(out.tokens[:, 0], minlength=v).double() / b
    assert bool(((freq - p).abs() <= 4 * se).all()), (freq, p)
    draft_freq = torch.bincount(drafts[:, 0], minlength=v).double() / b
    assert bool(((draft_freq - p).abs() > 4 * se).all())  # the check would catch returning the drafts
    accept_rate = torch.minimum(p, q).sum().item()  # P(accept) = sum_x min(p, q) = 0.6
    assert out.accepted.double().mean().item() == pytest.approx(accept_rate,
                                                                abs=4 * math.sqrt(0.6 * 0.4 / b))


def test_chain_accepts_prefix_and_stops_at_first_rejection():
    b, v = 1000, 3
    g = _gen(3)
    p0 = torch.randn(b, v, generator=g).softmax(-1)  # position 0: q == p, always accepted
    p1 = torch.tensor([0.0, 0.6, 0.4]).expand(b, v)  # position 1: draft 0 has p 0, q 1: always rejected
    p2 = torch.randn(b, v, generator=g).softmax(-1)  # position 2: never reached
    p = torch.stack([p0, p1, p2], dim=1)
    q = torch.stack([p0, torch.tensor([1.0, 0.0, 0.0]).expand(b, v), p2], dim=1)
    drafts = torch.stack([torch.multinomial(p0, 1, generator=g)[:, 0], torch.zeros(b, dtype=torch.int64),
                          torch.multinomial(p2, 1, generator=g)[:, 0]], dim=1)
    out = verify_drafts(_logits(p), q, drafts, _gen(4))
    assert out.accepted.tolist() == [1] * b
    assert out.n_new.tolist() == [2] * b
    assert torch.equal(out.tokens[:, 0], drafts[:, 0])
    assert bool((out.tokens[:, 1] != 0).all())  # the replacement comes from max(0, p - q) = p1, which forbids 0
    assert torch.equal(out.tokens[:, 2], drafts[:, 2])  # left as drafted, masked out
    assert out.valid.tolist() == [[True, True, False]] * b


def test_uniforms_are_drawn_row_major_one_per_position_then_the_replacement():
    """Ratio 0.5 at every position: acceptance is exactly u < 0.5 for the documented uniforms, and a rejection
    always resamples token 1 (residual max(0, [.5, .5] - [1, 0]) = [0, .5])."""
    b, n = 500, 3
    p = torch.tensor([0.5, 0.5]).expand(b, n, 2)
    q = torch.tensor([1.0, 0.0]).expand(b, n, 2)
    out = verify_drafts(_logits(p), q, torch.zeros(b, n, dtype=torch.int64), _gen(5))
    expected = (torch.rand((b, n), generator=_gen(5)) < 0.5).long().cumprod(-1).sum(-1)
    assert torch.equal(out.accepted, expected)
    assert 0 < int((expected == n).sum()) < b  # both outcomes occur, so the comparison means something
    rows = torch.arange(b)[expected < n]
    assert bool((out.tokens[rows, expected[rows]] == 1).all())
    again = verify_drafts(_logits(p), q, torch.zeros(b, n, dtype=torch.int64), _gen(5))
    assert all(torch.equal(x, y) for x, y in zip(out, again, strict=True))


def test_relaxation_accepts_every_draft_and_keeps_the_residual_of_p():
    b, n, v = 256, 4, 5
    g = _gen(6)
    p = torch.randn(b, n, v, generator=g).softmax(-1)
    q = (3 * torch.randn(b, n, v, generator=g)).softmax(-1)
    drafts = torch.multinomial(q.view(-1, v), 1, generator=g).view(b, n)
    exact = verify_drafts(_logits(p), q, drafts, _gen(7))
    assert int(exact.accepted.sum()) < b * n  # without the relaxation some drafts are rejected
    pooled = q + p  # p~(x) >= q(x) at every token: ratio >= 1
    as_tensor = verify_drafts(_logits(p), q, drafts, _gen(7), p_accept_probs=pooled)
    as_callable = verify_drafts(_logits(p), q, drafts, _gen(7),
                                p_accept_probs=lambda probs, x: q.gather(-1, x.unsqueeze(-1))[..., 0])
    for out in (as_tensor, as_callable):
        assert out.accepted.tolist() == [n] * b
        assert torch.equal(out.tokens, drafts)
    # A relaxed mass of 0 always rejects, and the replacement still comes from max(0, p - q), not from p~.
    p1 = torch.tensor([0.5, 0.5, 0.0]).expand(b, 1, 3)
    q1 = torch.tensor([1.0, 0.0, 0.0]).expand(b, 1, 3)
    out = verify_drafts(_logits(p1), q1, torch.zeros(b, 1, dtype=torch.int64), _gen(8),
                        p_accept_probs=torch.zeros(b, 1, 3))
    assert out.accepted.tolist() == [0] * b
    assert out.tokens[:, 0].tolist() == [1] * b
    # residual_q replaces q in the residual only (LANTERN's q with the neighbourhood zeroed): max(0, p - [0, 1, 0]).
    out = verify_drafts(_logits(p1), q1, torch.zeros(b, 1, dtype=torch.int64), _gen(8),
                        p_accept_probs=torch.zeros(b, 1, 3), residual_q=torch.tensor([0.0, 1.0, 0.0]).expand(b, 1, 3))
    assert out.tokens[:, 0].tolist() == [0] * b


@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf"])
def test_non_finite_logits_raise(bad):
    p_logits = torch.zeros(2, 3, 4)
    if bad == "nan":
        p_logits[1, 2, 0] = math.nan
    elif bad == "posinf":
        p_logits[0, 1, 3] = math.inf
    else:
        p_logits[1, 0] = -math.inf
    q = torch.full((2, 3, 4), 0.25)
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits reached the verify step"):
        verify_drafts(p_logits, q, torch.zeros(2, 3, dtype=torch.int64), _gen(0))


def test_bad_proposal_or_drafts_raise_value_error():
    p_logits, q, drafts = torch.zeros(2, 3, 4), torch.full((2, 3, 4), 0.25), torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="q_probs must be finite"):
        verify_drafts(p_logits, q * 2, drafts, _gen(0))
    with pytest.raises(ValueError, match=r"token ids in \[0, 4\)"):
        verify_drafts(p_logits, q, drafts + 4, _gen(0))
    with pytest.raises(ValueError, match="expects p_logits"):
        verify_drafts(p_logits, q[:, :2], drafts, _gen(0))


# -- draw_speculative: the loop's sampling of a step that carries drafts -------------------------------------------
def test_draw_speculative_keeps_the_bonus_or_the_replacement_then_the_jacobi_draws():
    """Greedy target (top_k = 1) over V = 4, L = 2 drafts + 1: argmax 1, 2, 3 at the three positions in row 0 and
    1, 2, 0 in row 1. Row 0 drafts (1, 2): both accepted, the bonus is the draw at position 2 (3): final 3.
    Row 1 drafts (1, 0): 1 accepted, 0 rejected and replaced from norm(max(0, p − q)) = p (token 2), then the
    draw at position 2 (0) stands as a Jacobi state: final 2. Stream: the sampler's multinomial over the 3·2
    position-major rows, then verify's (B, L) uniforms and its multinomial."""
    from varbench.harness.core.sampling import ScaleSampling
    from varbench.harness.core.sampling_raster import sample_raster
    from varbench.harness.core.sampling_verify import Drafts, draw_speculative

    peaks = torch.tensor([[1, 2, 3], [1, 2, 0]])
    logits = torch.nn.functional.one_hot(peaks, 4).float() * 5.0  # (B, 3, V)
    drafts = torch.tensor([[1, 2], [1, 0]])
    q = torch.nn.functional.one_hot(drafts, 4).float()
    s = ScaleSampling(top_k=1, top_p=1.0, temperature=1.0)
    g = _gen(7)
    out = draw_speculative(sample_raster, logits, False, 1.0, s, g, 0.0, Drafts(drafts, q))
    assert out.tokens.tolist() == [[1, 2, 3], [1, 2, 0]]
    assert out.final.tolist() == [3, 2] and out.verified.accepted.tolist() == [2, 1]
    replay = _gen(7)
    torch.multinomial(torch.ones(6, 4) / 4, 1, generator=replay)
    torch.rand((2, 2), generator=replay)
    torch.multinomial(torch.ones(2, 4) / 4, 1, generator=replay)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=replay))
    with pytest.raises(ValueError, match="a step with 2 drafts must feed 3 positions"):
        draw_speculative(sample_raster, logits[:, :2], False, 1.0, s, _gen(0), 0.0, Drafts(drafts, q))
