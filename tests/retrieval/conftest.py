"""Retrieval tests run torch single-threaded: on a shared 2-core machine, 2-thread BLAS calls on
small matrices stall in thread barriers (k-means builds measured 10x slower under load), which
would make the suite's time depend on the neighbours' load. Restored after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
