"""Checks of a packed variable-length batch (flash-attn's layout, :mod:`cab_attention.varlen`): q
``[total_q, Hq, D]``, k and v ``[total_k, Hkv, D]``, int32 ``cu_seqlens_q`` and ``cu_seqlens_k`` ``[B + 1]``.
:func:`check_varlen` raises ``ValueError`` naming the argument and returns every sequence's lengths."""

from __future__ import annotations

from typing import Any

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_packed(name: str, t: Any, heads_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [total, {heads_name}, D], got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D [total, {heads_name}, D] (flash-attn's packed layout), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float32, float16, bfloat16, float64), got {t.dtype}")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"{name} must have non-empty head and head_dim dimensions, got shape {tuple(t.shape)}")


def _seqlens(name: str, cu: Any, total: int, tensor_name: str) -> list[int]:
    """The per-sequence lengths of a ``cu_seqlens`` tensor, after checking it."""
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be an int32 torch.Tensor [B + 1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 (flash-attn's cu_seqlens), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D [B + 1] with B >= 1, got shape {tuple(cu.shape)}")
    vals = [int(x) for x in cu.tolist()]
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    bad = [i for i, n in enumerate(lens) if n < 0]
    if bad:
        i = bad[0]
        raise ValueError(
            f"{name} must be non-decreasing (sorted cumulative lengths), but {name}[{i + 1}] = {vals[i + 1]} "
            f"< {name}[{i}] = {vals[i]}"
        )
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] = {vals[-1]} must equal the packed length of {tensor_name} ({total})")
    return lens


def _check_max_seqlen(name: str, value: Any, lens: list[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int (the longest sequence, or an upper bound), got {value!r}")
    longest = max(lens)
    if value < longest:
        i = lens.index(longest)
        raise ValueError(f"{name} = {value} is smaller than the length of sequence {i} ({longest})")


def check_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> tuple[list[int], list[int]]:
    """Check packed inputs; return the query and key length of every sequence.

    Raises ``ValueError`` naming the argument for: wrong shapes or dtypes, q, k, v disagreeing (dtype,
    device, heads, head_dim), ``cu_seqlens`` not int32 ``[B + 1]``, not starting at 0, decreasing, not
    ending at the packed length, a different ``B`` for queries and keys, a ``max_seqlen`` below a real
    length, or a sequence with more queries than keys.
    """
    _check_packed("q", q, "Hq")
    _check_packed("k", k, "Hkv")
    named = [("k", k)] + ([("v", v)] if v is not None else [])
    if v is not None:
        _check_packed("v", v, "Hkv")
    for name, t in named:
        if t.dtype != q.dtype:
            raise ValueError(f"q, k and v must share one dtype; q is {q.dtype} but {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device; q is on {q.device} but {name} is on {t.device}")
        if t.shape[2] != q.shape[2]:
            raise ValueError(f"head_dim differs: q has D={q.shape[2]} but {name} has D={t.shape[2]}")
    if v is not None and v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k and v must have the same [total_k, Hkv], got {tuple(k.shape[:2])} and {tuple(v.shape[:2])}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"the query heads (Hq={q.shape[1]}) must be a multiple of the key/value heads (Hkv={k.shape[1]}) for GQA")
    lens_q = _seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q")
    lens_k = _seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k")
    if len(lens_q) != len(lens_k):
        raise ValueError(
            f"cu_seqlens_q describes B={len(lens_q)} sequences but cu_seqlens_k describes B={len(lens_k)}; "
            "they must describe the same batch"
        )
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, lens_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, lens_k)
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        if nq > nk:
            raise ValueError(
                f"sequence {b} has more queries than keys (Nq={nq} > Nk={nk}): queries must be the last Nq of "
                "the sequence's Nk positions"
            )
    return lens_q, lens_k
