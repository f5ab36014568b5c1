"""Stage 4, execute: block-sparse attention over a :class:`BlockSelection`.

Backends:

* ``reference``: exact dense-mask attention in the inputs' dtype (scores, softmax, weighted sum),
  computed in query chunks so that memory stays ``O(chunk x Nk)``; any device and dtype. It is the
  ground truth that every fast path is tested against.
* ``flex``: FlexAttention under ``torch.compile`` with a ``BlockMask`` from the coarse indices. The
  mask's ``BLOCK_SIZE`` is the selection block size, and on CUDA the kernel tile is set to divide it
  (``BLOCK_M = min(block_size, 128)``, ``BLOCK_N = min(block_size, 64)``); FlexAttention's default tile
  (128 x 64) would refuse a 64-token mask.
* ``auto``: ``flex`` on CUDA (``reference`` for float64, which FlexAttention does not take there),
  ``reference`` elsewhere.

Fewer queries than one block (decode, tiny chunks) take a dense path: every causally valid key.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from .geometry import BlockGrid, check_block_size, check_qkv
from .selection import BlockSelection
from .selectors import select_blocks

BACKENDS = ("auto", "reference", "flex")


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Dense attention with GQA and the chunked-prefill causal offset (queries are the last ``Nq``).

    Args: q ``[B, Hq, Nq, D]``, k, v ``[B, Hkv, Nk, D]``. Returns ``[B, Hq, Nq, D]``.
    """
    nq, nk = q.shape[2], k.shape[2]
    mask = None
    if causal:
        rows = torch.arange(nq, device=q.device) + (nk - nq)
        mask = torch.arange(nk, device=q.device)[None, :] <= rows[:, None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    *,
    scale: float | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Exact attention under the selection's token mask, in the inputs' dtype.

    Args: q ``[B, Hq, Nq, D]``, k, v ``[B, Hkv, Nk, D]``. Returns ``[B, Hq, Nq, D]``.
    """
    g = selection.grid
    b, hq, nq, d = q.shape
    hkv, grp = k.shape[1], hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    bs = g.block_size
    m = selection.query_head_mask().view(b, hkv, grp, g.num_q_blocks, g.num_kv_blocks)
    kt = k.transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, Nk]: shared by the group, not copied
    vv = v.unsqueeze(2)
    cols = torch.arange(g.kv_len, device=q.device)
    out = torch.empty_like(q).view(b, hkv, grp, nq, d)
    qg = q.view(b, hkv, grp, nq, d)
    for r0 in range(0, nq, chunk):
        r1 = min(nq, r0 + chunk)
        rows = torch.arange(r0, r1, device=q.device) + g.q_pad_front
        keep = m[:, :, :, rows // bs][..., cols // bs]  # [B, Hkv, G, rows, Nk]
        if g.causal:
            keep = keep & (cols[None, :] <= (rows + g.offset - g.q_pad_front)[:, None])
        s = torch.matmul(qg[:, :, :, r0:r1], kt) * scale
        s = s.masked_fill(~keep, float("-inf"))
        p = s.softmax(-1)
        out[:, :, :, r0:r1] = torch.matmul(p, vv)
    return out.view(b, hq, nq, d)


# Every new shape (B, H, N, D, block) recompiles the static-shape FlexAttention. Past dynamo's
# recompile limit (8 by default) dynamo would run flex_attention eagerly, and eager flex_attention
# applies only the mask_mod and ignores the block sparsity (wrong output, N x N memory). So the compiled
# function gets a limit of its own where torch.compile takes one (recompile_limit=, newer torch), and
# otherwise the global limit is raised to at least this, once.
_FLEX_RECOMPILE_LIMIT = 256


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    import inspect

    from torch.nn.attention.flex_attention import flex_attention

    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return torch.compile(flex_attention, dynamic=False, recompile_limit=_FLEX_RECOMPILE_LIMIT)
    import torch._dynamo.config as dc

    name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"
    if getattr(dc, name) < _FLEX_RECOMPILE_LIMIT:
        setattr(dc, name, _FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


def compiled_flex_attention():
    """The library's one compiled FlexAttention (static shapes, its own recompile limit), shared by every
    caller (e.g. :mod:`cab_attention.varlen`) so that the limit is counted once."""
    return _compiled_flex()


def flex_kernel_options(block_size: int, device_type: str) -> dict[str, Any] | None:
    """Kernel tiles that divide the selection block size (CUDA); ``None`` elsewhere."""
    if device_type != "cuda":
        return None
    return {"BLOCK_M": min(block_size, 128), "BLOCK_N": min(block_size, 64)}


def check_flex_available(q: torch.Tensor, block_size: int) -> None:
    """Raise ``ValueError`` where the flex backend cannot run."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch < 2.5
        raise ValueError(f"backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5): {e}") from e
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"backend='flex' runs on CUDA or CPU tensors, got device {q.device}; use backend='reference'")
    if q.device.type == "cuda" and block_size < 16:
        raise ValueError(f"backend='flex' on CUDA needs block_size >= 16 (its smallest tile), got {block_size}")
    if q.device.type == "cpu" and q.dtype == torch.float16:
        raise ValueError("backend='flex' on CPU does not support float16; use float32/bfloat16 or backend='reference'")
    if q.dtype == torch.float64 and q.device.type == "cuda":
        raise ValueError("backend='flex' on CUDA does not support float64; use backend='reference'")


def flex_attention_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: BlockSelection, *, scale: float | None = None
) -> torch.Tensor:
    """FlexAttention over the selection's ``BlockMask``. Shapes as :func:`reference_attention`."""
    g = selection.grid
    bs = g.block_size
    front = g.q_pad_front
    q_total = g.num_q_blocks * bs
    kv_total = g.num_kv_blocks * bs
    qp = F.pad(q, (0, 0, front, q_total - front - g.q_len)) if q_total != g.q_len else q
    if kv_total != g.kv_len:
        k = F.pad(k, (0, 0, 0, kv_total - g.kv_len))
        v = F.pad(v, (0, 0, 0, kv_total - g.kv_len))
    # The transposed (q-block) index is needed only when gradients will flow: FlexAttention refuses a
    # mask without it for inputs that require grad (e.g. CABAttention's projections in training).
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    block_mask = selection.to_block_mask(for_backward=needs_grad)
    out = _compiled_flex()(
        qp,
        k,
        v,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=flex_kernel_options(bs, q.device.type),
    )
    return out[:, :, front : front + g.q_len]


def _check_selection(selection: BlockSelection, q: torch.Tensor, k: torch.Tensor, block_size: int, causal: bool):
    if not isinstance(selection, BlockSelection):
        raise ValueError(f"selection must be a BlockSelection from select_blocks, got {type(selection).__name__}")
    want = BlockGrid.of(q, k, selection.grid.block_size, causal)
    if selection.grid != want:
        raise ValueError(
            f"selection was made for {selection.grid} but q, k describe {want}; select again for these inputs"
        )
    if selection.grid.block_size != block_size:
        raise ValueError(
            f"selection has block_size={selection.grid.block_size} but block_size={block_size} was passed"
        )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    selection: BlockSelection | None = None,
    selector: str = "cab",
    sparsity: float = 0.9,
    causal: bool = True,
    backend: str = "auto",
    block_size: int | None = None,
    **options: Any,
) -> torch.Tensor:
    """Block-sparse attention: select (unless ``selection`` is given), then execute.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` and ``Nq <= Nk``.
        selection: a :class:`BlockSelection` for these inputs; when given, ``selector``, ``sparsity`` and
            the selector options are not used.
        block_size: tokens per block (default 64; with ``selection``, the selection's).
        backend: ``"auto"`` (flex for CUDA tensors FlexAttention takes, i.e. not float64; else
            reference), ``"reference"`` or ``"flex"``.
        **options: selector options (see :func:`cab_attention.select_blocks`); ``scale`` also sets the
            attention scale (default ``D**-0.5``).

    Returns:
        ``[B, Hq, Nq, D]`` in q's dtype.
    """
    check_qkv(q, k, v)
    if block_size is None:
        block_size = selection.grid.block_size if isinstance(selection, BlockSelection) else 64
    check_block_size(block_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "flex" if q.is_cuda and q.dtype != torch.float64 else "reference"
    if backend == "flex":
        check_flex_available(q, block_size)
    scale = options.get("scale")
    if selection is None:
        selection = select_blocks(q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=causal, **options)
    else:
        extra = sorted(set(options) - {"scale"})
        if extra:
            raise ValueError(f"selector options {extra} have no effect with a given selection; pass them to select_blocks")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be True or False, got {causal!r}")
        _check_selection(selection, q, k, block_size, causal)
    if q.shape[2] < block_size:
        return dense_attention(q, k, v, causal=causal, scale=scale)
    if backend == "flex":
        return flex_attention_blocks(q, k, v, selection, scale=scale)
    return reference_attention(q, k, v, selection, scale=scale)
