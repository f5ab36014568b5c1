"""``select_blocks(impl="triton")`` and the CUDA-graph predictor: which calls replay a graph.

CPU only: the device check and both predictors are monkeypatched (spies), so this tests the dispatch and
the options handed over, not the kernels (``scripts/gpu_speed.sh`` checks graphed == eager on CUDA).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from cab_attention.kernels import graphs as G  # noqa: E402
from cab_attention.kernels import predictor as P  # noqa: E402
from cab_attention.options import resolve_options  # noqa: E402


@pytest.fixture
def spies(monkeypatch):
    calls = {"graphed": [], "eager": [], "antidiagonal": []}
    monkeypatch.setattr(P, "_on_cuda", lambda q: True)
    monkeypatch.setattr(G, "predict_graphed", lambda q, k, **kw: calls["graphed"].append(kw) or "graphed")
    monkeypatch.setattr(P, "predict", lambda q, k, **kw: calls["eager"].append(kw) or "eager")
    import cab_attention.kernels.antidiagonal as AD

    monkeypatch.setattr(AD, "predict_antidiagonal", lambda q, k, **kw: calls["antidiagonal"].append(kw) or "eager")
    monkeypatch.setattr(P, "check_runnable", lambda q: None)
    return calls


def call(selector, n=256, **options):
    q, k = torch.zeros(1, 4, n, 32), torch.zeros(1, 2, n, 32)
    return P.select_blocks_triton(q, k, selector=selector, sparsity=0.9, block_size=64, causal=True,
                                  opts=resolve_options(selector, dict(options, impl="triton")))


def test_zero_turns_graphs_off(spies, monkeypatch):
    assert isinstance(P.GRAPH_MAX_KEYS, int) and P.GRAPH_MAX_KEYS >= 0
    monkeypatch.setattr(P, "GRAPH_MAX_KEYS", 0)
    assert call("cab") == "eager" and not spies["graphed"]


@pytest.mark.parametrize("selector", ["cab", "magnitude", "antidiagonal"])
def test_short_inputs_replay_a_graph(spies, monkeypatch, selector):
    monkeypatch.setattr(P, "GRAPH_MAX_KEYS", 256)
    extra = {"score": "forman", "keep": "lowest"} if selector == "cab" else {}
    assert call(selector, **extra) == "graphed"
    kw = spies["graphed"][-1]
    assert kw["selector"] == selector and kw["sparsity"] == 0.9 and kw["block_size"] == 64 and kw["causal"] is True
    unknown = set(kw) - G._ACCEPTED[selector]
    assert not unknown, unknown  # predict_graphed would refuse them
    if selector == "cab":
        assert kw["score"] == "forman" and kw["keep"] == "lowest"
    assert call(selector, n=512) == "eager"  # longer than GRAPH_MAX_KEYS: eager


def test_uncapturable_calls_stay_eager(spies, monkeypatch):
    monkeypatch.setattr(P, "GRAPH_MAX_KEYS", 10**6)
    assert call("antidiagonal", threshold=0.9) == "eager"
    assert spies["antidiagonal"][-1]["threshold"] == 0.9 and not spies["graphed"]
    monkeypatch.setattr(P, "_on_cuda", lambda q: False)
    assert call("cab") == "eager" and not spies["graphed"]
