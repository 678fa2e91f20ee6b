"""Speed benchmarks of the small configurations, for the regression gate (harness/speedgate.py).

Run with `pytest tests/speed -m speed --benchmark-json=bench.json` (the default `pytest` deselects them);
one torch thread, so that the numbers do not depend on how many cores the machine lends.
"""

import pytest
import torch

from varbench.harness import SampleConfig, create_variant, generate
from varbench.harness.sampling import filter_top_k_top_p_
from varbench.variants import EngineConfig

pytestmark = pytest.mark.speed


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pedantic(benchmark, fn, rounds: int = 7):
    fn()  # warm-up: allocator growth, lazy init
    benchmark.pedantic(fn, rounds=rounds, iterations=1)


def test_reference_matmul(benchmark):
    """The machine's speed right now: every other benchmark is judged as a ratio to this one."""
    a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
    _pedantic(benchmark, lambda: [a @ a for _ in range(20)], rounds=15)


@pytest.mark.parametrize("engine", ["engine", "reference"])
def test_generate_test_var(benchmark, engine):
    cfg = EngineConfig("fp32") if engine == "engine" else EngineConfig.reference("fp32")
    variant = create_variant("test_var", engine=cfg)
    labels = torch.arange(2)
    _pedantic(benchmark, lambda: generate(variant, labels, SampleConfig(), g_seed=0))


def test_sampler_top_k_top_p(benchmark):
    logits = torch.randn(2, 256, 4096, generator=torch.Generator().manual_seed(0))
    _pedantic(benchmark, lambda: filter_top_k_top_p_(logits.clone(), 900, 0.96), rounds=15)


def test_vae_decode(benchmark):
    variant = create_variant("test_var")
    f_hat = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _pedantic(benchmark, lambda: variant.vae.decode(f_hat))
