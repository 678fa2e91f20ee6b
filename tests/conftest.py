"""Shared fixtures. Tests run on CPU in fp32 with 2 threads; the conformance fixtures live in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CONFORMANCE = SHARED / "conformance"
KEYS = SHARED / "docs" / "keys"


def need(path: Path) -> Path:
    """Skips the test when a file of ../shared is absent (e.g. a clone without the shared folder)."""
    if not path.exists():
        pytest.skip(f"{path} not present (the shared fixtures sit beside the repository)")
    return path


@pytest.fixture(scope="session")
def var_d2_dir() -> Path:
    return need(CONFORMANCE / "var_d2")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are latency-bound; two threads on a shared 2-core machine spin against each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
