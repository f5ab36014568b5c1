"""The Triton predictor: coarsen -> score -> select -> (mask build), as separate stages and end to end.

Stages (each a function, so benchmarks can time them apart; every tensor stays on the device):

* :func:`coarsen_stage` -> ``qc [B, Hq, Mq, D]``, ``kc [B, Hkv, Mk, D]`` (one kernel launch);
* :func:`score_stage` -> a :class:`Scores` (priority ``[B, Hq, Mq, Mk]`` fp32, written on edge tiles
  only, plus the candidate mask in two-stage mode): one affinity kernel, then for ``cab`` the fused
  redundancy + curvature kernel (or the two-stage kernels), for ``magnitude`` nothing more (the logits
  are the priority);
* :func:`select_stage` -> ``mask``, ``kv_num_blocks``, ``kv_indices`` (one kernel);
* :func:`block_mask` -> FlexAttention ``BlockMask`` from a selection without sorting (the diagonal is
  the only partial block of a causal row).

:func:`predict` chains them and returns a :class:`cab_attention.selection.BlockSelection` equal to
``select_blocks(..., impl="torch")`` (see ``docs/kernels.md`` for the tie-break contract and the
precision options).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..geometry import BlockGrid, check_block_size, check_qkv, check_sparsity
from ..options import SELECTOR_OPTIONS, resolve_options
from ..select import Scores, row_rank01
from ..selection import BlockSelection, dense_selection, make_mask_mod
from .coarsen import COARSEN_CODES, coarsen_qk
from .scores import PRECISIONS, affinity, redundancy_scores, two_stage_scores
from .topk import select_rows

SUPPORTED_SELECTORS = ("dense", "cab", "magnitude")
_NORMS = ("blocks", "rowmax", "none")


def _interpreting() -> bool:
    from .topk import _select_kernel

    return type(_select_kernel).__name__ == "InterpretedFunction"


def unavailable_reason(device: torch.device | str, dtype: torch.dtype | None = None) -> str | None:
    """Why the Triton kernels cannot run on this device / dtype, or ``None`` if they can."""
    device = torch.device(device)
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernels take float32, float16 or bfloat16 inputs, got {dtype}"
    if device.type == "cuda":
        if _interpreting():
            return "TRITON_INTERPRET=1 is set: the kernels were built for the CPU interpreter, not CUDA"
        return None
    if device.type == "cpu":
        if _interpreting():
            return None
        return "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before cab_attention.kernels is imported"
    return f"the Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), got device {device}"


def check_runnable(q: torch.Tensor) -> None:
    why = unavailable_reason(q.device, q.dtype)
    if why is not None:
        raise ValueError(f"impl='triton' cannot run here: {why}")


# ----------------------------------------------------------------------------------------------- stages


def coarsen_stage(q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, method: str = "max_l2"):
    """Stage 1: ``(qc [B, Hq, Mq, D], kc [B, Hkv, Mk, D])``, queries front-padded per ``grid``."""
    return coarsen_qk(q, k, grid.block_size, method, grid.q_pad_front)


# Stage-2 output: cab_attention.select.Scores (shared with the PyTorch stages).


def budget_for(grid: BlockGrid, sparsity: float, device) -> torch.Tensor:
    """``[Mq]`` int32, the exact fixed-sparsity budget of :meth:`BlockGrid.budget`."""
    return grid.budget(sparsity, device).to(torch.int32)


def candidate_budget(grid: BlockGrid, budget: torch.Tensor) -> torch.Tensor:
    """Two-stage candidates per row: the forced blocks plus ``min(2 r_i, free_i)`` by affinity, where
    ``r_i = k_i - #forced_i`` are the row's free picks and ``free_i`` its non-forced valid blocks."""
    dev = budget.device
    valid, forced = grid.valid(dev), grid.forced(dev)
    nf = (valid & forced).sum(-1)
    free = valid.sum(-1) - nf
    r = budget.long() - nf
    return (nf + torch.minimum(2 * r, free)).to(torch.int32)


def score_stage(
    qc: torch.Tensor,
    kc: torch.Tensor,
    grid: BlockGrid,
    *,
    selector: str = "cab",
    score: str | None = None,
    keep: str | None = None,
    lam: float = 0.5,
    norm: str = "blocks",
    hybrid: float = 0.0,
    scale: float | None = None,
    precision: str = "fp32",
    two_stage: bool = False,
    budget: torch.Tensor | None = None,
    redundancy: str = "fused",
    tiles: tuple[int, int, int, int] | None = None,
    keep_intermediates: bool = False,
) -> Scores:
    """Stage 2: the selector's priority for every block edge (see :mod:`cab_attention.kernels.scores`).

    ``selector="magnitude"``: the coarse logits. ``selector="cab"``: ``-F`` (keep lowest) or ``F``, with
    ``F`` the augmented Forman curvature or the triangle proxy; ``hybrid > 0`` mixes the row ranks of the
    curvature priority and of the logits as :func:`cab_attention.select.cab_priority` does (ranks by a torch sort).
    ``two_stage=True`` (triangle proxy only) needs ``budget`` and returns the candidate mask too.
    ``redundancy``: ``"fused"`` (``R`` tile by tile inside the curvature kernel, never in memory) or
    ``"matmul"`` (``R = torch.matmul(A[..., lo:lo+Mq], A)`` by the vendor library, full square product
    in ``A``'s dtype, then the same kernel's epilogue): which is faster is measured, not assumed
    (``scripts/gpu_kernels.py``). ``tiles``: ``(BM, BN, BK, num_warps)`` of the curvature kernel.
    ``score``/``keep`` ``None``: the selector's defaults in :func:`cab_attention.select_blocks`.
    """
    score, keep, _ = selector_defaults(selector, score, keep, "max_l2")
    scale = grid.head_dim**-0.5 if scale is None else float(scale)
    lo, causal = grid.block_offset, grid.causal
    if selector == "magnitude":
        out = affinity(qc, kc, lo, causal, scale, logits=True, precision=precision)
        return Scores(out["logits"])
    if selector != "cab":
        raise ValueError(f"the Triton predictor scores selectors {SUPPORTED_SELECTORS[1:]}, got {selector!r}")
    if two_stage:
        if budget is None:
            raise ValueError("two_stage=True needs the row budget")
        cb = candidate_budget(grid, budget)
        out = affinity(qc, kc, lo, causal, scale, logits=True, a=True, a_t=True, precision=precision)
        cand, cnum, cidx = select_rows(out["logits"], cb, lo, causal, index_width=max(int(cb.max()), 1))
        prio = two_stage_scores(out["A"], out["A_T"], cnum, cidx, lo, causal, keep=keep, lam=lam, norm=norm)
        extras = {"A": out["A"], "logits": out["logits"], "candidate_budget": cb} if keep_intermediates else None
        return Scores(prio, cand, extras)
    need_logits = hybrid > 0
    forman = score == "forman"
    rowmax = score == "triangle" and norm == "rowmax"
    if redundancy not in ("fused", "matmul"):
        raise ValueError(f"redundancy must be 'fused' or 'matmul', got {redundancy!r}")
    out = affinity(
        qc, kc, lo, causal, scale, logits=need_logits, a=True, sums=forman, rowmax=rowmax, precision=precision,
        zero_a=redundancy == "matmul",
    )
    r = None
    if redundancy == "matmul":
        r = torch.matmul(out["A"][..., lo : lo + grid.num_q_blocks], out["A"])
    prio = redundancy_scores(
        out["A"], lo, causal, score=score, keep=keep, lam=lam, norm=norm,
        s_out=out.get("S_out"), s_in=out.get("S_in"), a_rowmax=out.get("A_rowmax"), precision=precision, r=r,
        tiles=tiles,
    )
    if need_logits:
        valid = grid.valid(qc.device)
        w = float(hybrid)
        prio = (1 - w) * row_rank01(prio, valid) + w * row_rank01(out["logits"], valid)
    return Scores(prio, None, out if keep_intermediates else None)


def select_stage(
    scores: Scores | torch.Tensor,
    grid: BlockGrid,
    budget: torch.Tensor,
    *,
    share_kv: bool = False,
    write_mask: bool = True,
    index_width: int | None = None,
):
    """Stage 3: ``(mask [B, H, Mq, Mk] bool or None, kv_num_blocks [B, H, Mq] int32, kv_indices
    [B, H, Mq, W] int32)``; ``share_kv`` averages the priority over each KV head's query group first."""
    if isinstance(scores, torch.Tensor):
        scores = Scores(scores)
    prio = scores.priority
    if share_kv:
        if scores.candidates is not None:
            raise ValueError("share_kv is not supported with two_stage=True")
        b, hq, mq, mk = prio.shape
        prio = prio.view(b, grid.kv_heads, grid.group, mq, mk).mean(2)
    return select_rows(
        prio, budget, grid.block_offset, grid.causal,
        candidates=scores.candidates, write_mask=write_mask, index_width=index_width,
    )


def _has_compute_q_blocks() -> bool:
    from torch.nn.attention.flex_attention import BlockMask

    return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


def flex_blocks(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, grid: BlockGrid
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a selection's rows into FlexAttention's partial and full blocks without sorting.

    With kept blocks ascending, a causal row's only partial block is its diagonal, which is its largest
    kept block (a partial last key block can only be kept as the diagonal); a non-causal row's only
    partial block is the last key block when ``Nk % block_size`` and it is kept (again the largest).
    So the full blocks are the first ``num - partial`` entries of ``kv_indices`` itself.

    Returns: ``(partial_num, partial_idx, full_num, full_idx)``; ``partial_idx`` is ``[..., 1]`` wide.
    """
    mk = grid.num_kv_blocks
    dev = kv_num_blocks.device
    if grid.causal:
        p = grid.diagonal(dev).to(torch.int32)
        part_num = torch.ones_like(kv_num_blocks)
        part_idx = p.view(1, 1, -1, 1).expand(*kv_num_blocks.shape, 1)
    elif grid.kv_len % grid.block_size:
        last = kv_indices.gather(-1, (kv_num_blocks.long() - 1).clamp_min(0).unsqueeze(-1))
        part_num = (last.squeeze(-1) == mk - 1).to(torch.int32)
        part_idx = torch.full((*kv_num_blocks.shape, 1), mk - 1, dtype=torch.int32, device=dev)
    else:
        part_num = torch.zeros_like(kv_num_blocks)
        part_idx = torch.zeros((*kv_num_blocks.shape, 1), dtype=torch.int32, device=dev)
    return part_num, part_idx.contiguous(), kv_num_blocks - part_num, kv_indices


def block_mask(selection: BlockSelection, compact: bool | None = None):
    """Stage 4: the FlexAttention ``BlockMask`` of a selection, equal to ``selection.to_block_mask()``
    but built in ``O(B H Mq)`` from its ``kv_indices`` (see :func:`flex_blocks`); the transposed (q)
    indices, needed only for the backward pass, are skipped where ``from_kv_blocks`` allows it.

    ``compact=True`` stores the partial-block index one column wide. It is off by default: FlexAttention's
    CPU lowering needs the index ``Mk`` wide, and on CUDA (torch 2.11) the compact form failed the GPU
    check (``scripts/gpu_kernels.py``)."""
    from torch.nn.attention.flex_attention import BlockMask

    g = selection.grid
    num, idx = selection.kv_num_blocks, selection.kv_indices
    if selection.shared_kv:
        num = num.repeat_interleave(g.group, dim=1)
        idx = idx.repeat_interleave(g.group, dim=1)
    pn, pi, fn, fi = flex_blocks(num, idx, g)
    kwargs: dict[str, Any] = {}
    has_cq = _has_compute_q_blocks()
    if has_cq:
        kwargs["compute_q_blocks"] = False
    if compact is None:
        # Off by default: on the H100 (torch 2.11, 2026-11-25, scripts/gpu_kernels.py) the compact index
        # gave wrong FlexAttention output (max |diff| ~1 vs to_block_mask); the full width was exact.
        compact = False
    if not (compact and has_cq):
        wide = torch.zeros(*pi.shape[:-1], g.num_kv_blocks, dtype=torch.int32, device=pi.device)
        wide[..., :1] = pi
        pi = wide
    return BlockMask.from_kv_blocks(
        pn, pi, fn, fi, BLOCK_SIZE=g.block_size, mask_mod=make_mask_mod(g),
        seq_lengths=(g.num_q_blocks * g.block_size, g.num_kv_blocks * g.block_size), **kwargs,
    )


# ------------------------------------------------------------------------------------------ end to end


def check_options(
    *, selector: str, score: str, keep: str, lam: float, norm: str, hybrid: float, coarsen: str,
    two_stage: bool, share_kv: bool, precision: str,
) -> None:
    """Raise ``ValueError`` for options the Triton predictor does not take."""
    if selector not in SUPPORTED_SELECTORS:
        raise ValueError(
            f"impl='triton' supports selectors {SUPPORTED_SELECTORS} here and 'antidiagonal' through "
            f"kernels.predict_antidiagonal, got {selector!r}; use impl='torch'"
        )
    if score not in ("forman", "triangle"):
        raise ValueError(f"score must be 'forman' or 'triangle', got {score!r}")
    if keep not in ("lowest", "highest"):
        raise ValueError(f"keep must be 'lowest' or 'highest', got {keep!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < float("inf"):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if isinstance(hybrid, bool) or not isinstance(hybrid, (int, float)) or not 0 <= hybrid <= 1:
        raise ValueError(f"hybrid must be a number in [0, 1], got {hybrid!r}")
    if coarsen not in COARSEN_CODES:
        raise ValueError(f"coarsen must be one of {tuple(COARSEN_CODES)}, got {coarsen!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if two_stage:
        if selector != "cab" or score != "triangle" or norm == "rowmax" or hybrid > 0 or share_kv:
            raise ValueError(
                "two_stage=True re-ranks candidates by the triangle proxy: it needs selector='cab', "
                "score='triangle', norm 'blocks' or 'none', hybrid=0 and share_kv=False"
            )


def _dense_selection(grid: BlockGrid, heads: int, selector: str, share_kv: bool, device) -> BlockSelection:
    return dense_selection(grid, selector, share_kv, device)


def selector_defaults(
    selector: str, score: str | None, keep: str | None, coarsen: str | None
) -> tuple[str, str, str]:
    """Fill ``None`` options with the library's defaults for ``selector`` (the ones ``select_blocks``
    uses), so that the Triton path and the torch path agree without repeating the defaults here."""
    d = resolve_options(selector, {}) if selector in SELECTOR_OPTIONS else {}
    return (
        d.get("score", "forman") if score is None else score,
        d.get("keep", "lowest") if keep is None else keep,
        d.get("coarsen", "max_l2") if coarsen is None else coarsen,
    )


def predict(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    sparsity: float = 0.9,
    causal: bool = True,
    selector: str = "cab",
    score: str | None = None,
    keep: str | None = None,
    lam: float = 0.5,
    norm: str = "blocks",
    hybrid: float = 0.0,
    scale: float | None = None,
    coarsen: str | None = None,
    two_stage: bool = False,
    share_kv: bool = False,
    precision: str = "fp32",
    redundancy: str = "fused",
    head_chunk: int | None = None,
) -> BlockSelection:
    """The whole Triton predictor: coarsen, score, select; returns a :class:`BlockSelection`.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]`` (CUDA, or CPU under ``TRITON_INTERPRET=1``;
            float32/float16/bfloat16).
        selector: ``"cab"`` (curvature), ``"magnitude"`` (coarse logits, the same kernels minus the
            curvature) or ``"dense"``.
        score, keep, lam, norm, hybrid, coarsen, share_kv, scale: as in
            :func:`cab_attention.select_blocks` (``None``: that selector's default there).
        two_stage: candidates = forced + the top ``2 r_i`` blocks by coarse logit, re-ranked by the
            triangle proxy computed for the candidates only (an approximation; see ``docs/kernels.md``).
        precision: ``"fp32"`` (default; equals the PyTorch path to float32 rounding), ``"tf32"`` or
            ``"bf16"`` (``A`` in bfloat16 and tensor-core matmuls: the fast path, approximate).
        redundancy: ``"fused"`` (default) or ``"matmul"`` (``R`` by ``torch.matmul``); see
            :func:`score_stage`.
        head_chunk: score and select this many query heads at a time (rounded up to whole KV groups)
            to bound the ``M x M`` working buffers (``A``, priority); ``None``: all heads at once.

    Returns:
        A :class:`BlockSelection` (exact budgets, sink and diagonal kept, ties to the larger key block).
    """
    check_qkv(q, k)
    score, keep, coarsen = selector_defaults(selector, score, keep, coarsen)
    check_block_size(block_size)
    check_sparsity(sparsity)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    check_options(
        selector=selector, score=score, keep=keep, lam=lam, norm=norm, hybrid=hybrid, coarsen=coarsen,
        two_stage=two_stage, share_kv=share_kv, precision=precision,
    )
    check_runnable(q)
    grid = BlockGrid.of(q, k, block_size, causal)
    dev = q.device
    heads = grid.kv_heads if share_kv else grid.q_heads
    if selector == "dense" or grid.q_len < block_size:
        return _dense_selection(grid, heads, selector, share_kv, dev)
    budget = budget_for(grid, sparsity, dev)
    qc, kc = coarsen_stage(q, k, grid, coarsen)
    kw = dict(selector=selector, score=score, keep=keep, lam=lam, norm=norm, hybrid=hybrid, scale=scale,
              precision=precision, two_stage=two_stage, budget=budget, redundancy=redundancy)
    g = grid.group
    kv_per_chunk = grid.kv_heads if head_chunk is None else max(1, -(-int(head_chunk) // g))
    if kv_per_chunk >= grid.kv_heads:
        sc = score_stage(qc, kc, grid, **kw)
        mask, num, idx = select_stage(sc, grid, budget, share_kv=share_kv)
        return BlockSelection(mask, num, idx, grid, selector, share_kv)
    mq, mk = grid.num_q_blocks, grid.num_kv_blocks
    mask = torch.empty(grid.batch, heads, mq, mk, dtype=torch.bool, device=dev)
    num = torch.empty(grid.batch, heads, mq, dtype=torch.int32, device=dev)
    idx = torch.empty(grid.batch, heads, mq, mk, dtype=torch.int32, device=dev)
    per = 1 if share_kv else g  # output heads per KV head
    for h0 in range(0, grid.kv_heads, kv_per_chunk):
        h1 = min(grid.kv_heads, h0 + kv_per_chunk)
        sub = BlockGrid(grid.batch, (h1 - h0) * g, h1 - h0, grid.q_len, grid.kv_len, grid.head_dim,
                        grid.block_size, grid.causal)
        sc = score_stage(qc[:, h0 * g : h1 * g], kc[:, h0:h1], sub, **kw)
        m_, n_, i_ = select_stage(sc, sub, budget, share_kv=share_kv)
        del sc
        mask[:, h0 * per : h1 * per], num[:, h0 * per : h1 * per], idx[:, h0 * per : h1 * per] = m_, n_, i_
    return BlockSelection(mask, num, idx, grid, selector, share_kv)


#: ``select_blocks(..., impl="triton")`` replays a CUDA graph (:func:`cab_attention.kernels.graphs.predict_graphed`)
#: for CUDA inputs with at most this many keys, where the options are capturable (fixed sparsity, no
#: diagnostics). 0 = off. 8192: the longest N at which the graphed path was checked equal to the eager
#: one on a GPU: ``scripts/gpu_predictor.py --no-bench`` on one NVIDIA H200, 2026-12-04 (torch 2.11, triton
#: 3.6), "graphed vs eager" PASS for cab, magnitude and antidiagonal at 64- and 128-token blocks, bf16,
#: N = 1k, 4k and 8k (results/gpu-2026-12-04/predictor-checks/). Longer inputs run eagerly until a run
#: checks them; whether the graph is faster was not measured in that run.
GRAPH_MAX_KEYS = 8192


def _on_cuda(q: torch.Tensor) -> bool:
    return q.device.type == "cuda"


def graph_options(selector: str, opts: dict[str, Any]) -> dict[str, Any] | None:
    """The :func:`predict_graphed` keyword options for a resolved ``select_blocks`` call, or ``None`` when the
    call is not capturable (adaptive ``threshold``, diagnostics, a selector without a graphed path)."""
    if opts.get("threshold") is not None or opts.get("return_diagnostics"):
        return None
    if selector == "antidiagonal":
        names = ("stride", "scale", "share_kv")
    elif selector == "cab":
        names = ("score", "keep", "lam", "norm", "hybrid", "scale", "coarsen", "share_kv")
    elif selector == "magnitude":
        names = ("scale", "coarsen", "share_kv")
    else:
        return None
    return {name: opts[name] for name in names if name in opts}


def select_blocks_triton(
    q: torch.Tensor, k: torch.Tensor, *, selector: str, sparsity: float, block_size: int, causal: bool,
    opts: dict[str, Any],
) -> BlockSelection:
    """``select_blocks(..., impl="triton")`` after :func:`cab_attention.options.resolve_options`. Short CUDA
    inputs (at most :data:`GRAPH_MAX_KEYS` keys) replay a CUDA graph of the same kernels."""
    if _on_cuda(q) and k.shape[2] <= GRAPH_MAX_KEYS and opts.get("edges", "causal") == "causal":
        gopts = graph_options(selector, opts)
        if gopts is not None:
            from .graphs import predict_graphed

            return predict_graphed(q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=causal,
                                   **gopts)
    if selector == "antidiagonal":  # its own fused kernel (kernels/antidiagonal.py), adaptive mode too
        from .antidiagonal import predict_antidiagonal

        if opts.get("return_diagnostics"):
            raise ValueError("impl='triton' does not return diagnostics; use impl='torch'")
        check_runnable(q)
        return predict_antidiagonal(
            q, k, block_size=block_size, sparsity=sparsity, causal=causal, stride=int(opts.get("stride", 8)),
            scale=opts.get("scale"), threshold=opts.get("threshold"), share_kv=bool(opts.get("share_kv")),
        )
    if opts.get("threshold") is not None:
        raise ValueError("impl='triton' supports fixed sparsity only (threshold=None); use impl='torch'")
    if opts.get("return_diagnostics"):
        raise ValueError("impl='triton' does not return diagnostics (it never materialises R); use impl='torch'")
    if opts.get("edges", "causal") != "causal":
        raise ValueError(f"impl='triton' supports edges='causal' only, got edges={opts['edges']!r}; use impl='torch'")
    cab = {name: opts[name] for name in ("score", "keep", "lam", "norm", "hybrid") if name in opts}
    return predict(
        q, k, block_size=block_size, sparsity=sparsity, causal=causal, selector=selector,
        scale=opts.get("scale"), coarsen=opts.get("coarsen", "max_l2"), share_kv=bool(opts.get("share_kv")),
        **cab,
    )
