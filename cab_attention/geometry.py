"""Input checks and the block grid that every stage shares.

Queries may be shorter than keys (chunked prefill): the ``Nq`` queries are the *last* ``Nq`` positions
of the ``Nk`` keys, so query ``t`` sits at absolute position ``Nk - Nq + t``. To keep query blocks
aligned with key blocks (so that "the diagonal block" is one block, and FlexAttention's tiles line up),
the queries are padded at the front by ``(Nk - Nq) % block_size`` rows and at the end up to a whole
block; padded rows are computed and dropped, never returned. Keys are padded at the end only. No token is
ever dropped.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` unless q ``[B, Hq, Nq, D]`` and k, v ``[B, Hkv, Nk, D]`` fit together."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (float32, float16, bfloat16, float64), got {t.dtype}")
        if t.shape[2] == 0 or t.shape[3] == 0 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} must have non-empty dimensions, got shape {tuple(t.shape)}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise ValueError(f"q, k and v must share one dtype; q is {q.dtype} but {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device; q is on {q.device} but {name} is on {t.device}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"batch size differs: q has B={q.shape[0]} but {name} has B={t.shape[0]}")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"head_dim differs: q has D={q.shape[3]} but {name} has D={t.shape[3]}")
    if v is not None:
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
        if v.shape[2] != k.shape[2]:
            raise ValueError(f"k and v must have the same length, got Nk={k.shape[2]} and {v.shape[2]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"the query heads (Hq={hq}) must be a multiple of the key/value heads (Hkv={hkv}) for GQA")
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q is longer than k (Nq={q.shape[2]} > Nk={k.shape[2]}): queries must be the last Nq of the Nk positions"
        )


def check_finite(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first of ``tensors`` (``name=tensor``) that holds a NaN or an inf.

    One ``aminmax`` per tensor (a full read; NaN propagates through it, so a finite min and max mean
    every entry is finite) and one host sync for all of them together.
    """
    if not tensors:
        return
    ends = torch.stack([torch.stack(torch.aminmax(t)).float() for t in tensors.values()])
    ok = torch.isfinite(ends).all(-1).tolist()
    for (name, t), fine in zip(tensors.items(), ok):
        if not fine:
            raise ValueError(
                f"{name} holds NaN or inf values (shape {tuple(t.shape)}); attention needs finite {name}. "
                "Pass check_finite=False to skip this check"
            )


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a positive power of two (16, 32, 64, 128, ...), got {block_size!r}")


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (0.0 < float(threshold) <= 1.0):
        raise ValueError(f"threshold (adaptive mode) must be a number in (0, 1], got {threshold!r}")


def blocks_kept(valid: torch.Tensor | int, sparsity: float) -> torch.Tensor | int:
    """The fixed-sparsity budget, the one home of its formula: a row with ``v`` causally valid blocks
    keeps ``min(v, max(2, ceil((1 - sparsity) * v)))`` (the sink and diagonal blocks included).

    Args: valid: an int, or an integer tensor of per-row counts (returned as int64 of its shape).
    """
    # ceil in float64 with a small guard so that e.g. (1 - 0.9) * 10 = 1.0000000000000002 counts 1.
    if isinstance(valid, torch.Tensor):
        keep = torch.ceil((1.0 - float(sparsity)) * valid.double() - 1e-9).long()
        return torch.minimum(valid.long(), keep.clamp_min(2))
    return min(int(valid), max(2, math.ceil((1.0 - float(sparsity)) * int(valid) - 1e-9)))


@dataclass(frozen=True)
class BlockGrid:
    """The coarse block grid of one attention call.

    ``Mq`` query blocks (front- and end-padded queries), ``Mk`` key blocks; query block ``i`` covers
    absolute key-block ``i + block_offset``, which is its diagonal block.

    ``window`` (tokens, causal grids only): a sliding window as transformers defines it, query ``p`` sees
    keys ``p - window < j <= p``. The valid blocks are then the blocks the window reaches for some real
    query of the row, the forced blocks the row's first valid block (a window-local sink) and its
    diagonal, and the budget counts over the valid blocks, so every selector works unchanged inside it.
    """

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    block_size: int
    causal: bool
    window: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
                raise ValueError(f"window must be None or a positive int (tokens), got {self.window!r}")
            if not self.causal:
                raise ValueError("window needs a causal grid (a sliding window is a causal pattern)")

    @property
    def offset(self) -> int:
        """Absolute position of the first query."""
        return self.kv_len - self.q_len

    @property
    def q_pad_front(self) -> int:
        return self.offset % self.block_size

    @property
    def block_offset(self) -> int:
        return self.offset // self.block_size

    @property
    def num_q_blocks(self) -> int:
        return math.ceil((self.q_pad_front + self.q_len) / self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.kv_len / self.block_size)

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def diagonal(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[Mq]`` int64: the key block holding each query block's last position."""
        i = torch.arange(self.num_q_blocks, device=device)
        return (i + self.block_offset).clamp_max(self.num_kv_blocks - 1)

    def first_valid(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[Mq]`` int64: each row's first valid key block, its sink (0 without a window; with one, the
        block holding the earliest key the row's first real query sees)."""
        mq = self.num_q_blocks
        if self.window is None:
            return torch.zeros(mq, dtype=torch.long, device=device)
        i = torch.arange(mq, device=device)
        # Absolute position of each row's first real query (front-padded rows are not real).
        first_q = (i * self.block_size + self.offset - self.q_pad_front).clamp_min(self.offset)
        return ((first_q - self.window + 1).clamp_min(0) // self.block_size).clamp_max(self.num_kv_blocks - 1)

    def valid(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[Mq, Mk]`` bool: causally valid block edges (every key block when not causal), inside the
        window when there is one."""
        mq, mk = self.num_q_blocks, self.num_kv_blocks
        if not self.causal:
            return torch.ones(mq, mk, dtype=torch.bool, device=device)
        j = torch.arange(mk, device=device)
        ok = j[None, :] <= self.diagonal(device)[:, None]
        if self.window is not None:
            ok &= j[None, :] >= self.first_valid(device)[:, None]
        return ok

    def forced(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[Mq, Mk]`` bool: the sink block (block 0, or the row's first block inside the window) and
        the diagonal block of each row."""
        mk = self.num_kv_blocks
        j = torch.arange(mk, device=device)
        return (j[None, :] == self.first_valid(device)[:, None]) | (j[None, :] == self.diagonal(device)[:, None])

    def budget(self, sparsity: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[Mq]`` int64: ``k_i = min(v_i, max(2, ceil((1 - sparsity) * v_i)))`` blocks per row
        (:func:`blocks_kept` of each row's ``v_i`` valid blocks)."""
        return blocks_kept(self.valid(device).sum(-1), sparsity)

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, block_size: int, causal: bool, window: int | None = None) -> "BlockGrid":
        b, hq, nq, d = q.shape
        return cls(b, hq, k.shape[1], nq, k.shape[2], d, block_size, bool(causal), window)
