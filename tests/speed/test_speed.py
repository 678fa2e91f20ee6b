"""Speed benchmarks of the small configurations, for the regression gate (harness/run/speedgate.py).

Run with `pytest tests/speed -m speed --benchmark-json=bench.json` (the default `pytest` deselects them);
one torch thread, so that the numbers do not depend on how many cores the machine lends.

Each benchmark names the `test_reference_*` workloads it is judged against: frozen plain-torch work of the same
kind, so that a CPU with relatively faster convolutions (or GEMMs, or sorts) moves both sides of the ratio.
The references run about as long per round as the benchmarks (0.2-0.3 s): on a busy machine the minimum of a
short workload finds a quiet moment that a long one cannot, which would skew the ratios.
Token generation and the VQVAE decode are timed apart for that reason: their mix of work differs.
"""

import pytest
import torch
import torch.nn.functional as F

from varbench.harness import SampleConfig, create_variant, generate
from varbench.harness.core.sampling import filter_top_k_top_p_
from varbench.variants import EngineConfig

pytestmark = pytest.mark.speed

# The test VQVAE decoder's heaviest convolutions (in, out, kernel, side, count), 4.1 of its 15.8 GFLOP.
DECODER_CONVS = ((32, 32, 3, 256, 2), (32, 32, 3, 128, 2), (64, 64, 3, 64, 2), (128, 128, 3, 16, 3))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pedantic(benchmark, fn, references: tuple[str, ...] = (), rounds: int = 7):
    if references:
        benchmark.extra_info["reference"] = [f"test_reference_{r}" for r in references]
    fn()  # warm-up: allocator growth, lazy init
    benchmark.pedantic(fn, rounds=rounds, iterations=1)


def test_reference_matmul(benchmark):
    """GEMM speed: the transformer's linear layers."""
    a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
    _pedantic(benchmark, lambda: [a @ a for _ in range(200)])


def test_reference_conv(benchmark):
    """Convolution speed, at the shapes the VQVAE decoder spends its time in."""
    gen = torch.Generator().manual_seed(0)
    convs = [(torch.randn(1, cin, side, side, generator=gen), torch.randn(cout, cin, k, k, generator=gen), count)
             for cin, cout, k, side, count in DECODER_CONVS]
    _pedantic(benchmark, lambda: [F.conv2d(x, w, padding=1) for x, w, count in convs for _ in range(5 * count)])


def test_reference_vector(benchmark):
    """Sort, random draws and softmax over a vocabulary-wide tensor: the sampler's kind of work."""
    x = torch.randn(512, 4096, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    _pedantic(benchmark, lambda: (x.sort(dim=-1), torch.empty_like(x).exponential_(generator=gen), x.softmax(-1)))


@pytest.mark.parametrize("engine", ["engine", "reference"])
def test_tokens_test_var(benchmark, engine):
    """The sampling loop up to the last scale's tokens (the decode is timed by test_vae_decode)."""
    cfg = EngineConfig("fp32") if engine == "engine" else EngineConfig.reference("fp32")
    variant = create_variant("test_var", engine=cfg)
    variant.decode = lambda state: None
    labels = torch.arange(2)
    _pedantic(benchmark, lambda: generate(variant, labels, SampleConfig(), g_seed=0), ("matmul", "vector"))


def test_sampler_top_k_top_p(benchmark):
    logits = torch.randn(2, 256, 4096, generator=torch.Generator().manual_seed(0))
    _pedantic(benchmark, lambda: filter_top_k_top_p_(logits.clone(), 900, 0.96), ("vector",), rounds=15)


def test_vae_decode(benchmark):
    variant = create_variant("test_var")
    f_hat = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _pedantic(benchmark, lambda: variant.vae.decode(f_hat), ("conv",))
