"""The README's example variant runs as written, and with guidance on at every scale it is plain test_var."""

import re
from pathlib import Path

import torch

from varbench.harness import VARIANTS, SampleConfig, create_variant, generate

README = Path(__file__).resolve().parents[1] / "README.md"


def _example_source() -> str:
    text = README.read_text()
    match = re.search(r"<!-- example-variant -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its example variant"
    return match.group(1)


def test_readme_example_variant_runs_through_the_loop():
    namespace: dict = {}
    if "example_late_unguided" not in VARIANTS:
        exec(compile(_example_source(), "README.md", "exec"), namespace)
    else:  # already registered by an earlier run in this process
        namespace["images"] = generate(create_variant("example_late_unguided", from_scale=6), torch.arange(2),
                                       SampleConfig(cfg=1.5), g_seed=0).images
    images = namespace["images"]
    assert images.shape == (2, 3, 256, 256) and 0 <= images.min() and images.max() <= 1

    labels, sampling = torch.arange(2), SampleConfig(cfg=1.5)
    plain = generate(create_variant("test_var"), labels, sampling, g_seed=0).tokens
    all_guided = generate(create_variant("example_late_unguided", from_scale=10), labels, sampling, g_seed=0).tokens
    late = generate(create_variant("example_late_unguided", from_scale=6), labels, sampling, g_seed=0).tokens
    assert all(torch.equal(a, b) for a, b in zip(plain, all_guided))
    assert all(torch.equal(a, b) for a, b in zip(plain[:6], late[:6]))  # the same until guidance stops
    assert not all(torch.equal(a, b) for a, b in zip(plain[6:], late[6:]))
