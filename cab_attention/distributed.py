"""Context parallel block-sparse attention on torch.distributed, DeepSpeed-Ulysses style.

**Layout.** ``P`` ranks of a process group share one attention call. The sequence is cut into ``P``
contiguous shards: rank ``r`` holds positions ``[r * n, (r + 1) * n)`` of every sequence of the batch,

* q ``[B, Hq, nq, D]`` with ``nq = Nq / P``, k and v ``[B, Hkv, nk, D]`` with ``nk = Nk / P``,

all heads, every rank the same ``B``, heads, ``D``, ``nq`` and ``nk`` (:func:`shard_sequence` cuts a
full tensor this way; :func:`gather_sequence` puts the shards back together). As everywhere in the
library, ``Nq <= Nk`` and the ``Nq`` queries are the *last* ``Nq`` of the ``Nk`` positions.

**Steps** (:func:`context_parallel_attention`):

1. one ``torch.distributed.all_to_all_single`` per tensor to the head-sharded layout
   (:func:`seq_to_head`): rank ``r`` receives the *full* sequence of query heads ``[r Hq/P, (r+1) Hq/P)``
   and KV heads ``[r Hkv/P, (r+1) Hkv/P)``. Query head ``h`` reads KV head ``h // (Hq / Hkv)``, so these
   contiguous ranges keep every KV head together with its whole query group (GQA): no KV head is
   repeated or sent twice;
2. the usual :func:`cab_attention.select_blocks` and :func:`cab_attention.sparse_attention` on
   ``[B, Hq/P, N, D]``, exactly as one process would run them: a head's selection depends only on that
   head (on its KV group with ``share_kv``), so each rank computes the one-process result of its heads;
3. one all-to-all back (:func:`head_to_seq`): ``[B, Hq, nq, D]`` on every rank, the output shard of its
   own queries.

Each all-to-all moves ``(P - 1) / P`` of a rank's shard; per layer a rank sends and receives q, k, v and
the output once. NCCL on GPUs, gloo on CPU (both implement ``all_to_all_single``). Forward only (prefill):
the collectives are torch.distributed's plain ones, not autograd functions.

**Heads that do not divide the world size.** Ulysses splits heads, so it needs ``Hkv % P == 0`` (then
``Hq % P == 0`` too). Otherwise :func:`context_parallel_attention` raises ``ValueError``. We chose the
error over two alternatives: *repeating KV heads* up to ``P`` (DeepSpeed's fallback when ``P > Hkv``)
costs ``P / Hkv`` times the KV memory and traffic and splits a query group's selection (``share_kv``)
across ranks; *ring attention over KV shards* (each rank keeps its query shard while the KV shards
circulate in ``P - 1`` steps, merging partial softmaxes; PyTorch's
``torch.distributed.tensor.experimental.context_parallel`` does this for dense SDPA) has no head
constraint, but the block selection needs every key block's coarse keys for every query block, and the
per-step sparse kernel would need its block mask cut per KV shard. Ring attention is the way past the
head limit; it would be a module of its own.

**The random selector** draws its priorities from the shapes and its seed only, never from q or k, and
one process draws ``[B, Hq, Mq, Mk]`` at once. So every rank draws for all ``Hq`` heads (from a stride-0
view of its own heads: no copy) and keeps its own heads' rows: every world size gives the one-process
mask. In adaptive mode (``threshold``) the budget also reads the coarse logits, so the stand-in heads
are ``P`` copies of the rank's own (a full-size q and k during selection, for this baseline only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from .options import DEFAULT_SELECTOR
from .execute import sparse_attention
from .geometry import check_qkv
from .selection import BlockSelection
from .select import select_blocks


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "context parallel attention needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def shard_sequence(x: torch.Tensor, group=None, dim: int = 2) -> torch.Tensor:
    """This rank's contiguous shard of a full tensor along ``dim`` (the sequence; default 2 of
    ``[B, H, N, D]``): positions ``[r N / P, (r + 1) N / P)``. ``ValueError`` unless ``P`` divides ``N``."""
    p, r = _world(group)
    n = x.shape[dim]
    if n % p:
        raise ValueError(
            f"the sequence length N={n} (dim {dim}) must be divisible by the world size P={p} for context "
            f"parallel shards; pad the sequence to a multiple of {p}"
        )
    return x.narrow(dim, r * (n // p), n // p)


def gather_sequence(x: torch.Tensor, group=None, dim: int = 2) -> torch.Tensor:
    """The full tensor from every rank's equal shard along ``dim`` (``all_gather``, rank order)."""
    p, _ = _world(group)
    parts = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def seq_to_head(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-to-all from sequence shards to head shards.

    Args: x ``[B, H, n, D]``, this rank's positions ``[r n, (r + 1) n)`` of all heads; ``H % P == 0``.
    Returns: ``[B, H / P, P n, D]``, heads ``[r H/P, (r + 1) H/P)`` over the whole sequence.
    """
    p, _ = _world(group)
    b, h, n, d = x.shape
    send = x.reshape(b, p, h // p, n, d).transpose(0, 1).contiguous()  # chunk j: the heads rank j owns
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's sequence shard of my heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * n, d)


def head_to_seq(y: torch.Tensor, group=None) -> torch.Tensor:
    """All-to-all from head shards back to sequence shards (the inverse of :func:`seq_to_head`).

    Args: y ``[B, H / P, N, D]``, this rank's heads over the whole sequence; ``N % P == 0``.
    Returns: ``[B, H, N / P, D]``, this rank's positions of all heads.
    """
    p, _ = _world(group)
    b, hl, n_full, d = y.shape
    n = n_full // p
    send = y.reshape(b, hl, p, n, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk j: sequence shard j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's heads of my sequence shard
    return recv.transpose(0, 1).reshape(b, p * hl, n, d)


def check_context_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, check_shards: bool = True) -> None:
    """``ValueError`` unless the shards fit :func:`context_parallel_attention`: the usual q, k, v checks,
    ``Hkv % P == 0`` and (``check_shards``, one small ``all_gather``) equal shard shapes on every rank."""
    check_qkv(q, k, v)
    p, _ = _world(group)
    hq, hkv = q.shape[1], k.shape[1]
    if hkv % p:
        raise ValueError(
            f"context parallel (Ulysses) splits heads across ranks: the key/value heads (Hkv={hkv}) must be "
            f"divisible by the world size P={p} (Hq={hq}). Use a world size that divides Hkv, or ring "
            "attention over KV shards (see cab_attention.distributed's docstring)"
        )
    if check_shards:
        mine = torch.tensor([q.shape[0], hq, q.shape[2], hkv, k.shape[2], q.shape[3]], device=q.device)
        every = [torch.empty_like(mine) for _ in range(p)]
        dist.all_gather(every, mine, group=group)
        shapes = [tuple(t.tolist()) for t in every]
        if len(set(shapes)) > 1:
            raise ValueError(
                "every rank must hold an equal contiguous shard: (B, Hq, nq, Hkv, nk, D) per rank is "
                f"{shapes}; cut the full sequence with shard_sequence (N divisible by P)"
            )


def _select_random(qh: torch.Tensor, kh: torch.Tensor, p: int, r: int, **kwargs: Any) -> BlockSelection:
    """The one-process random selection of this rank's heads (see the module docstring)."""
    b, hl, n, d = qh.shape
    hkl = kh.shape[1]
    if kwargs.get("threshold") is None:
        # The draw alone decides: stride-0 views stand in for the other ranks' heads.
        qf, kf = qh[:, :1].expand(b, hl * p, n, d), kh[:, :1].expand(b, hkl * p, kh.shape[2], d)
    else:
        # Adaptive mode also reads the coarse logits: P copies of this rank's heads put them in place.
        qf, kf = qh.repeat(1, p, 1, 1), kh.repeat(1, p, 1, 1)
    full = select_blocks(qf, kf, **kwargs)
    heads = full.mask.shape[1] // p  # query heads, or KV heads with share_kv
    cut = slice(r * heads, (r + 1) * heads)
    grid = dataclasses.replace(full.grid, q_heads=hl, kv_heads=hkl)
    return BlockSelection(
        full.mask[:, cut].contiguous(),
        full.kv_num_blocks[:, cut].contiguous(),
        full.kv_indices[:, cut].contiguous(),
        grid,
        full.selector,
        full.shared_kv,
        None,
    )


def select_heads(
    qh: torch.Tensor,
    kh: torch.Tensor,
    group=None,
    *,
    selector: str = DEFAULT_SELECTOR,
    sparsity: float = 0.9,
    block_size: int = 64,
    causal: bool = True,
    **options: Any,
) -> BlockSelection:
    """:func:`cab_attention.select_blocks` on this rank's heads in the head-sharded layout
    (qh ``[B, Hq/P, Nq, D]``, kh ``[B, Hkv/P, Nk, D]``), equal to those heads of the one-process
    selection for every selector."""
    kwargs = dict(selector=selector, sparsity=sparsity, block_size=block_size, causal=causal, **options)
    if selector == "random":
        p, r = _world(group)
        return _select_random(qh, kh, p, r, **kwargs)
    return select_blocks(qh, kh, **kwargs)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    selector: str = DEFAULT_SELECTOR,
    sparsity: float = 0.9,
    block_size: int = 64,
    causal: bool = True,
    backend: str = "auto",
    check_shards: bool = True,
    **options: Any,
) -> torch.Tensor:
    """Block-sparse attention over a sequence sharded across the ranks of ``group`` (Ulysses).

    Args:
        q: ``[B, Hq, Nq / P, D]``, k, v: ``[B, Hkv, Nk / P, D]``: this rank's contiguous shard (see the
            module docstring); ``Hkv % P == 0``.
        group: the process group (default: the world).
        selector, sparsity, block_size, causal, backend, **options: as
            :func:`cab_attention.sparse_attention`, applied to the full sequence.
        check_shards: check with one small ``all_gather`` that every rank holds an equal shard.

    Returns:
        ``[B, Hq, Nq / P, D]``: the output of this rank's queries, equal to the matching rows of the
        one-process :func:`cab_attention.sparse_attention` (same backend).
    """
    check_context_parallel(q, k, v, group, check_shards)
    qh, kh, vh = (seq_to_head(x, group) for x in (q, k, v))
    sel = select_heads(qh, kh, group, selector=selector, sparsity=sparsity, block_size=block_size, causal=causal, **options)
    scale = options.get("scale")
    out = sparse_attention(qh, kh, vh, selection=sel, causal=causal, backend=backend, scale=scale)
    return head_to_seq(out, group)
