"""CUDA graphs for the Triton predictor: one captured graph per (shapes, options) key.

At 1k-8k tokens the predictor's kernels run for microseconds, while the host side (Python, a dozen
launches, the small torch ops of the budget and the stage glue) costs far more. :func:`predict_graphed`
captures the device work of one predictor call once per key and replays it:

* ``cab`` / ``magnitude``: the coarsening kernel runs eagerly on the caller's ``q``/``k`` (it reads
  them once, as the eager path does) into the entry's fixed ``qc``/``kc`` buffers; the graph holds the
  score and select stages (their inputs are those buffers). Per call: one launch and one replay.
* ``antidiagonal``: the mass kernel reads Q and K themselves, whose addresses a graph fixes, so ``q``
  and ``k`` are copied into the entry's buffers first (one read and one write of Q and K), then replay.

The budget (``[Mq]``, a function of the grid and the sparsity only) is computed once per key, outside
the graph. Supported: fixed sparsity, the options of :func:`cab_attention.kernels.predict` except
``two_stage`` (its candidate count is a host-side value) and ``head_chunk``, plus ``stride`` for
``antidiagonal``. The result equals :func:`cab_attention.kernels.predict` /
:func:`cab_attention.kernels.predict_antidiagonal` on the same inputs (checked on CUDA by
``scripts/gpu_predictor.py``).

Memory: each entry keeps its graph's private pool (the ``M x M`` working buffers of one call: ~2 MB at
8k tokens with 32 heads and 64-token blocks, ~1 GB at 128k), so this is for short sequences; the
cache keeps ``max_entries`` keys (least recently used evicted). ``clone=False`` returns the graph's own
output buffers: valid until the next call with the same key.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch

from ..geometry import BlockGrid, check_block_size, check_qkv, check_sparsity
from ..selection import BlockSelection

_UNSUPPORTED = ("two_stage", "head_chunk", "threshold", "return_diagnostics")
_COMMON = {"selector", "block_size", "sparsity", "causal", "scale", "share_kv", "precision"}
_ACCEPTED = {
    "cab": _COMMON | {"score", "keep", "lam", "norm", "hybrid", "coarsen", "redundancy"},
    "magnitude": _COMMON | {"coarsen"},
    "antidiagonal": _COMMON | {"stride", "passes"},
}


def graph_key(q: torch.Tensor, k: torch.Tensor, options: dict[str, Any]) -> tuple:
    """The cache key of a call: shapes, dtypes, device and the (hashable) options, sorted by name."""
    items = tuple(sorted(options.items()))
    try:
        hash(items)
    except TypeError as e:
        raise ValueError(f"predictor options must be hashable values (numbers, strings, bools, None): {e}") from e
    return (tuple(q.shape), tuple(k.shape), q.dtype, k.dtype, q.device.type, q.device.index, items)


class GraphCache:
    """A least-recently-used map ``key -> entry`` that builds an entry once per key.

    ``hits``/``misses`` count lookups; ``max_entries`` bounds the entries kept (an evicted entry frees
    its graph and memory pool once nothing else refers to it).
    """

    def __init__(self, max_entries: int = 16):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The entry for ``key``, built by ``build()`` on a miss."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        entry = build()
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries


DEFAULT_CACHE = GraphCache()


class _CapturedPredictor:
    """Static input buffers, the budget, and the captured score + select graph of one key."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, opts: dict[str, Any], warmup: int = 2):
        from .predictor import check_options, selector_defaults

        self.selector = opts.get("selector", "cab")
        self.block_size = int(opts.get("block_size", 64))
        sparsity = opts.get("sparsity", 0.9)
        causal = opts.get("causal", True)
        check_block_size(self.block_size)
        check_sparsity(sparsity)
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be True or False, got {causal!r}")
        self.grid = g = BlockGrid.of(q, k, self.block_size, causal)
        self.share_kv = bool(opts.get("share_kv", False))
        self.precision = opts.get("precision", "fp32")
        scale = opts.get("scale")
        self.scale = g.head_dim**-0.5 if scale is None else float(scale)
        dev = q.device
        self.budget = g.budget(sparsity, dev).to(torch.int32)
        if self.selector == "antidiagonal":
            self.stride = int(opts.get("stride", 8))
            self.passes = opts.get("passes", 1)
            if self.stride < 1 or self.block_size % self.stride:
                raise ValueError(f"stride must be a positive divisor of block_size={self.block_size}, got {self.stride!r}")
            self.q_in = torch.empty(q.shape, device=dev, dtype=q.dtype)
            self.k_in = torch.empty(k.shape, device=dev, dtype=k.dtype)
        else:
            score, keep, coarsen = selector_defaults(self.selector, opts.get("score"), opts.get("keep"),
                                                     opts.get("coarsen"))
            self.coarsen = coarsen
            self.score_kw = dict(
                selector=self.selector, score=score, keep=keep, lam=opts.get("lam", 0.5),
                norm=opts.get("norm", "blocks"), hybrid=opts.get("hybrid", 0.0), scale=scale,
                precision=self.precision, redundancy=opts.get("redundancy", "fused"),
            )
            check_options(
                selector=self.selector, score=score, keep=keep, lam=self.score_kw["lam"], norm=self.score_kw["norm"],
                hybrid=self.score_kw["hybrid"], coarsen=coarsen, two_stage=False, share_kv=self.share_kv,
                precision=self.precision,
            )
            self.qc = torch.empty(g.batch, g.q_heads, g.num_q_blocks, g.head_dim, device=dev, dtype=q.dtype)
            self.kc = torch.empty(g.batch, g.kv_heads, g.num_kv_blocks, g.head_dim, device=dev, dtype=k.dtype)
        self._fill(q, k)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # compiles the kernels and settles the allocator before capture
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._body()

    def _fill(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if self.selector == "antidiagonal":
            self.q_in.copy_(q)
            self.k_in.copy_(k)
        else:
            from .coarsen import coarsen_qk

            coarsen_qk(q, k, self.block_size, self.coarsen, self.grid.q_pad_front, out=(self.qc, self.kc))

    def _body(self):
        from .topk import select_rows

        g = self.grid
        if self.selector == "antidiagonal":
            from .antidiagonal import antidiagonal_mass

            mass = antidiagonal_mass(self.q_in, self.k_in, g, self.scale, self.stride, precision=self.precision,
                                     passes=self.passes)
            if self.share_kv:
                mass = mass.reshape(g.batch, g.kv_heads, g.group, *mass.shape[2:]).mean(2)
            return select_rows(mass, self.budget, g.block_offset, g.causal)
        from .predictor import score_stage, select_stage

        sc = score_stage(self.qc, self.kc, g, **self.score_kw)
        return select_stage(sc, g, self.budget, share_kv=self.share_kv)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, clone: bool = True) -> BlockSelection:
        self._fill(q, k)
        self.graph.replay()
        mask, num, idx = self.outputs
        if clone:
            mask, num, idx = mask.clone(), num.clone(), idx.clone()
        return BlockSelection(mask, num, idx, self.grid, self.selector, self.share_kv)


def predict_graphed(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    cache: GraphCache | None = None,
    clone: bool = True,
    **options: Any,
) -> BlockSelection:
    """The Triton predictor through a CUDA graph captured once per (shapes, dtypes, device, options).

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]``, CUDA, float32/float16/bfloat16.
        cache: where the graphs live (default: the module's :data:`DEFAULT_CACHE`).
        clone: return copies of the outputs (``False``: the graph's buffers, overwritten by the next
            call with the same key).
        **options: ``selector`` (``"cab"``, ``"magnitude"``, ``"antidiagonal"``), ``block_size``,
            ``sparsity``, ``causal`` and the options of :func:`cab_attention.kernels.predict` (or
            ``stride``, ``scale``, ``share_kv``, ``precision``, ``passes`` for ``antidiagonal``); an
            unknown option raises ``ValueError``.

    Returns:
        The :class:`BlockSelection` that :func:`cab_attention.kernels.predict` (or
        ``predict_antidiagonal``) gives for the same call. Dense cases (``selector="dense"``, fewer
        queries than a block) go to those functions directly: nothing to capture.
    """
    check_qkv(q, k)
    bad = sorted(set(options) & set(_UNSUPPORTED))
    if bad:
        raise ValueError(f"predict_graphed does not take {bad} (host-side values or not capturable); use predict")
    selector = options.get("selector", "cab")
    if selector not in ("cab", "magnitude", "antidiagonal", "dense"):
        raise ValueError(f"selector must be 'cab', 'magnitude', 'antidiagonal' or 'dense', got {selector!r}")
    unknown = sorted(set(options) - _ACCEPTED.get(selector, _COMMON))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for predict_graphed with selector {selector!r}; "
                         f"it accepts {sorted(_ACCEPTED.get(selector, _COMMON))}")
    if q.device.type != "cuda":
        raise ValueError(f"predict_graphed needs CUDA tensors (CUDA graphs), got device {q.device}")
    from .predictor import check_runnable

    check_runnable(q)
    if selector == "dense" or q.shape[2] < int(options.get("block_size", 64)):
        from .antidiagonal import predict_antidiagonal
        from .predictor import predict

        if selector == "antidiagonal":
            return predict_antidiagonal(q, k, **{n: v for n, v in options.items() if n != "selector"})
        return predict(q, k, **options)
    cache = DEFAULT_CACHE if cache is None else cache
    entry = cache.get(graph_key(q, k, options), lambda: _CapturedPredictor(q, k, options))
    return entry(q, k, clone=clone)
