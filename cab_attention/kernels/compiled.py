"""A CAB forward (Triton predictor + FlexAttention) that compiles with ``torch.compile(fullgraph=True)``.

How it stays one graph:

* the predictor is a ``torch.library.custom_op`` (``cab_attention::predict_flex``): opaque to dynamo,
  with a fake implementation that gives its output shapes from the input shapes, so the Triton launches
  (and their host-side glue) never break the graph;
* the ``BlockMask`` is built inside the graph with ``BlockMask.from_kv_blocks`` from the op's four
  index tensors (partial = the diagonal block, full = the rest; no sort, no transposed index), and the
  true length enters the ``mask_mod`` as a captured 0-d tensor, not as a Python int.

Length buckets: the compiled function only ever sees lengths padded (at the end) to a bucket:
``bucket="pow2"`` rounds ``N`` up to a power of two (at least ``min_bucket``, default 1024), an ``int``
rounds up to a multiple of it. Each bucket compiles once (``dynamic=False``); new lengths inside a seen
bucket reuse the graph. With ``pow2`` the lengths 1k..128k are 8 buckets, dynamo's default recompile
limit (``torch._dynamo.config.recompile_limit``, 8): raise it for more. Padding costs no attention work:
padded query blocks attend to one (fully masked) block, and no real query block can select a padded key
block (they are outside its causal edge set). The predictor runs on the real, unpadded length.

Scope: self-attention prefill (``Nq == Nk``), selectors ``cab``/``magnitude``/``dense``, fixed sparsity.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..execute import flex_kernel_options
from ..geometry import BlockGrid, blocks_kept, check_block_size, check_qkv, check_sparsity
from .predictor import (
    _dense_selection,
    budget_for,
    check_options,
    check_runnable,
    coarsen_stage,
    flex_blocks,
    score_stage,
    select_stage,
)


def bucket_length(n: int, bucket: str | int = "pow2", min_bucket: int = 1024, block_size: int = 64) -> int:
    """The padded length the compiled graph sees for a sequence of ``n`` tokens (a multiple of
    ``block_size``)."""
    if bucket == "pow2":
        nb = max(int(min_bucket), 1 << max(int(n) - 1, 0).bit_length())
    elif isinstance(bucket, int) and not isinstance(bucket, bool) and bucket > 0:
        nb = -(-int(n) // bucket) * bucket
    else:
        raise ValueError(f"bucket must be 'pow2' or a positive int, got {bucket!r}")
    return -(-nb // block_size) * block_size


def index_width(num_blocks: int, sparsity: float, selector: str = "cab") -> int:
    """Columns of the compact full-block index: the largest row budget on a grid of ``num_blocks``."""
    if selector == "dense":
        return num_blocks
    return max(1, blocks_kept(num_blocks, sparsity))


@torch.library.custom_op("cab_attention::predict_flex", mutates_args=())
def predict_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    n: torch.Tensor,
    block_size: int,
    sparsity: float,
    causal: bool,
    selector: str,
    score: str,
    keep: str,
    lam: float,
    norm: str,
    hybrid: float,
    scale: float,
    coarsen: str,
    precision: str,
    compact: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton predictor on the first ``n`` tokens of padded ``q``/``k`` ``[B, H, Nb, D]``.

    Returns FlexAttention's ``(partial_num [B, Hq, Mb], partial_idx [B, Hq, Mb, 1], full_num [B, Hq, Mb],
    full_idx [B, Hq, Mb, W])`` on the bucket grid ``Mb = Nb / block_size``; padded rows keep only their
    own (fully masked) diagonal block. ``scale <= 0`` means ``D**-0.5``. ``compact``: index widths 1 and
    ``W`` (the largest row budget) instead of ``Mb`` (FlexAttention's CPU lowering needs ``Mb``).
    """
    length = int(n.item())
    b, hq, nb, _ = q.shape
    mb = nb // block_size
    w = index_width(mb, sparsity, selector) if compact else mb
    wp = 1 if compact else mb
    qv, kv = q[:, :, :length], k[:, :, :length]
    grid = BlockGrid.of(qv, kv, block_size, causal)
    m = grid.num_q_blocks
    if selector == "dense" or length < block_size:
        sel = _dense_selection(grid, hq, selector, False, q.device)
        num, idx = sel.kv_num_blocks, sel.kv_indices[..., :w]
    else:
        budget = budget_for(grid, sparsity, q.device)
        qc, kc = coarsen_stage(qv, kv, grid, coarsen)
        sc = score_stage(
            qc, kc, grid, selector=selector, score=score, keep=keep, lam=lam, norm=norm, hybrid=hybrid,
            scale=scale if scale > 0 else None, precision=precision, budget=budget,
        )
        _, num, idx = select_stage(sc, grid, budget, write_mask=False, index_width=w)
    pn, pi, fn, fi = flex_blocks(num, idx, grid)
    dev = q.device
    part_num = torch.ones(b, hq, mb, dtype=torch.int32, device=dev)
    part_idx = torch.zeros(b, hq, mb, wp, dtype=torch.int32, device=dev)
    part_idx[..., 0] = torch.arange(mb, dtype=torch.int32, device=dev)
    full_num = torch.zeros(b, hq, mb, dtype=torch.int32, device=dev)
    full_idx = torch.zeros(b, hq, mb, w, dtype=torch.int32, device=dev)
    part_num[:, :, :m] = pn
    part_idx[:, :, :m, :1] = pi
    full_num[:, :, :m] = fn
    full_idx[:, :, :m, : fi.shape[-1]] = fi[..., :w]
    return part_num, part_idx, full_num, full_idx


@predict_flex.register_fake
def _predict_flex_fake(q, k, n, block_size, sparsity, causal, selector, score, keep, lam, norm, hybrid, scale,
                       coarsen, precision, compact):
    b, hq, nb, _ = q.shape
    mb = nb // block_size
    w = index_width(mb, sparsity, selector) if compact else mb
    i32 = torch.int32
    return (
        q.new_empty(b, hq, mb, dtype=i32),
        q.new_empty(b, hq, mb, 1 if compact else mb, dtype=i32),
        q.new_empty(b, hq, mb, dtype=i32),
        q.new_empty(b, hq, mb, w, dtype=i32),
    )


def _forward(qp, kp, vp, n, block_size, sparsity, causal, selector, score, keep, lam, norm, hybrid, scale,
             coarsen, precision, compact, kernel_options):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    nb = qp.shape[2]
    pn, pi, fn, fi = torch.ops.cab_attention.predict_flex(
        qp, kp, n, block_size, sparsity, causal, selector, score, keep, lam, norm, hybrid, scale, coarsen, precision,
        compact,
    )

    def mask_mod(b, h, q_idx, kv_idx):
        inside = kv_idx < n
        if causal:
            return inside & (kv_idx <= q_idx)
        return inside

    bm = BlockMask.from_kv_blocks(
        pn, pi, fn, fi, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(nb, nb), compute_q_blocks=False
    )
    return flex_attention(
        qp, kp, vp, block_mask=bm, scale=(scale if scale > 0 else None),
        enable_gqa=qp.shape[1] != kp.shape[1], kernel_options=kernel_options,
    )


@functools.lru_cache(maxsize=None)
def compiled_forward():
    """The ``torch.compile(fullgraph=True, dynamic=False)`` graph of the padded forward (one per process)."""
    return torch.compile(_forward, fullgraph=True, dynamic=False)


def cab_attention_compiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sparsity: float = 0.9,
    block_size: int = 64,
    causal: bool = True,
    selector: str = "cab",
    score: str | None = None,
    keep: str | None = None,
    lam: float = 0.5,
    norm: str = "blocks",
    hybrid: float = 0.0,
    scale: float | None = None,
    coarsen: str | None = None,
    precision: str = "fp32",
    bucket: str | int = "pow2",
    min_bucket: int = 1024,
    compact: bool | None = None,
) -> torch.Tensor:
    """Compiled CAB attention: ``[B, Hq, N, D]`` from q ``[B, Hq, N, D]``, k, v ``[B, Hkv, N, D]``.

    Pads to :func:`bucket_length`, runs the compiled graph (predictor custom op + BlockMask +
    FlexAttention), and returns the first ``N`` rows. Options as :func:`cab_attention.kernels.predict`;
    ``compact=True`` stores the block indices ``W = max budget`` wide instead of ``Mb`` (at 128k and 95%
    sparsity 20x less index memory). Off by default: FlexAttention's CPU lowering needs the full width,
    and on the H100 (torch 2.11) the compact form gave wrong output in ``scripts/gpu_kernels.py``.
    """
    from .predictor import selector_defaults

    check_qkv(q, k, v)
    score, keep, coarsen = selector_defaults(selector, score, keep, coarsen)
    check_block_size(block_size)
    check_sparsity(sparsity)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"the compiled forward is for self-attention prefill (Nq == Nk), got Nq={q.shape[2]}, Nk={k.shape[2]}"
        )
    check_options(
        selector=selector, score=score, keep=keep, lam=lam, norm=norm, hybrid=hybrid, coarsen=coarsen,
        two_stage=False, share_kv=False, precision=precision,
    )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"scale must be None or a positive number, got {scale!r}")
    check_runnable(q)
    from torch.nn.attention.flex_attention import BlockMask
    import inspect

    if "compute_q_blocks" not in inspect.signature(BlockMask.from_kv_blocks).parameters:
        raise ValueError("the compiled forward needs BlockMask.from_kv_blocks(compute_q_blocks=...) (newer torch)")
    n = q.shape[2]
    nb = bucket_length(n, bucket, min_bucket, block_size)
    if nb != n:
        q, k, v = (F.pad(t, (0, 0, 0, nb - n)) for t in (q, k, v))
    n_t = torch.tensor(n, dtype=torch.int32, device=q.device)
    out = compiled_forward()(
        q, k, v, n_t, block_size, float(sparsity), causal, selector, score, keep, float(lam), norm, float(hybrid),
        float(scale) if scale is not None else -1.0, coarsen, precision,
        bool(compact), flex_kernel_options(block_size, q.device.type),
    )
    return out[:, :, :n]
