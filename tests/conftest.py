"""Shared fixtures: seeded random attention inputs and a small hypothesis profile.

CI runs on two shared cores, so property tests default to few examples and no deadline (the first
call of a torch op can take far longer than the later ones).
"""

from __future__ import annotations

import os

# The test suite runs the Triton kernels on the CPU through Triton's interpreter. The variable must be
# set before any module decorates a kernel, and several test modules import the kernels (directly, or
# through select_blocks(impl="triton") and the benchmark harness), so it is set here, once, for all.
# GPU runs of the kernels go through scripts/gpu_kernels.py, not pytest.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from reference import make_qkv  # noqa: E402

try:
    from hypothesis import settings

    settings.register_profile("cab-ci", max_examples=25, deadline=None, derandomize=True)
    settings.register_profile("cab-long", max_examples=300, deadline=None)
    settings.load_profile(os.environ.get("CAB_HYPOTHESIS_PROFILE", "cab-ci"))
except ImportError:  # hypothesis is a dev extra; only the property tests need it
    pass


@pytest.fixture
def qkv():
    """Factory fixture: ``qkv(b, hq, hkv, nq, nk, d, dtype=..., seed=...)``."""
    return make_qkv
