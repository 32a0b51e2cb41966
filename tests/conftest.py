"""Fixtures any test module may use by name."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a module runs: tiny matrices run fastest on one, and on a busy machine a second
    thread mostly waits. A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def torch_kernels_only():
    """Serve with PyTorch's kernels, not Murmur's own CPU kernels (murmur/infer/cpu_kernels), for the layers
    built inside the test: the paths a machine without a C++ compiler takes."""
    from murmur.infer import cpu_kernels

    cpu_kernels.set_enabled(False)
    yield
    cpu_kernels.set_enabled(True)
