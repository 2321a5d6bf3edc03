"""Fixtures and markers shared by the test modules.

`cuda` tests (tests/test_cuda.py, `make test-gpu`) run where a GPU is and are skipped cleanly
elsewhere, so CI on CPU stays green.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """2 cores shared by several jobs: a second OpenMP thread spin-waits and is ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
