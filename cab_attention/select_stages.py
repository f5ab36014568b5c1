"""Stages 1-3 of the PyTorch predictor, one function each: :func:`coarsen_stage` (coarse vectors),
:func:`score_stage` (a priority per block edge, :class:`Scores`; ``cab``'s is :func:`cab_priority`) and
:func:`select_stage` (keep the first ``budget`` blocks of each row's order, :mod:`cab_attention.select_order`).

They have the names, arguments and outputs of the Triton stages in :mod:`cab_attention.kernels.predictor`,
so a benchmark can time either side stage by stage; :func:`cab_attention.select.select_blocks` is built
from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import score as S
from .coarsen import coarsen
from .geometry import BlockGrid
from .options import defaults, resolve_options
from .select_order import keep_first, rank_rows, row_rank01
from .selection import kv_layout

__all__ = ["Scores", "cab_priority", "coarsen_stage", "score_stage", "select_stage"]


@dataclass
class Scores:
    """Stage-2 output.

    Attributes:
        priority: ``[B, Hq, Mq, Mk]`` float32, higher is kept first (the Triton stage writes edge tiles
            only; the rest is never read as a candidate).
        candidates: ``[B, Hq, Mq, Mk]`` bool, the Triton two-stage mode's candidates; ``None`` otherwise.
        extras: the intermediate tensors when asked for (``keep_intermediates=True``), else ``None``.
        demote: ``[B, Hq, Mq, Mk]`` bool, valid blocks ranked after all others (PyTorch ``cab`` with
            ``edges="positive"``); ``None`` otherwise.
    """

    priority: torch.Tensor
    candidates: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] | None = None
    demote: torch.Tensor | None = None


def coarsen_stage(
    q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, method: str = "max_l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: ``(qc [B, Hq, Mq, D], kc [B, Hkv, Mk, D])`` in the inputs' dtype, queries front-padded
    per ``grid`` (see :func:`cab_attention.coarsen.coarsen`)."""
    return coarsen(q, grid.block_size, method, pad_front=grid.q_pad_front), coarsen(k, grid.block_size, method)


def cab_priority(
    logits: torch.Tensor,
    grid: BlockGrid,
    *,
    score: str,
    keep: str,
    lam: float = 0.5,
    norm: str = "blocks",
    hybrid: float = 0.0,
    edges: str = "causal",
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """``cab``'s priority from the coarse logits ``[B, Hq, Mq, Mk]``.

    Returns ``(priority [B, Hq, Mq, Mk] float32, demote or None, {"A", "R", "scores"})``: the curvature
    ``F`` (augmented Forman or triangle proxy, :mod:`cab_attention.score`), negated for ``keep="lowest"``;
    ``hybrid > 0`` mixes the row ranks of that priority and of the logits; ``edges="positive"`` demotes
    zero-affinity blocks.
    """
    valid = grid.valid(logits.device)
    a = S.affinity(logits, valid)
    r = S.redundancy(a, grid)
    f = S.augmented_forman(a, r) if score == "forman" else S.triangle_proxy(a, r, lam=float(lam), norm=norm)
    demote = a <= 0 if edges == "positive" else None
    prio = -f if keep == "lowest" else f
    w = float(hybrid)
    if w > 0:
        prio = (1 - w) * row_rank01(prio, valid) + w * row_rank01(logits, valid)
    return prio, demote, {"A": a, "R": r, "scores": f}


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
    edges: str = "causal",
    keep_intermediates: bool = False,
) -> Scores:
    """Stage 2 in PyTorch: the selector's priority for every block edge, from the coarse vectors.

    Args:
        qc: ``[B, Hq, Mq, D]``; kc: ``[B, Hkv, Mk, D]`` (from :func:`coarsen_stage`).
        selector: ``"cab"`` (curvature, :func:`cab_priority`) or ``"magnitude"`` (the coarse logits), the
            selectors scored from coarse vectors alone.
        score, keep: ``None`` takes the selector's defaults (:mod:`cab_attention.options`).
        precision: ``"fp32"`` only (the Triton stage also takes ``"tf32"``/``"bf16"``).
        two_stage: ``False`` only here; the PyTorch twin of the Triton two-stage mode is
            :func:`cab_attention.kernels.reference.two_stage_reference`. ``budget`` is unused.
        edges: ``"causal"`` or ``"positive"`` (PyTorch only).
        keep_intermediates: keep ``logits``, ``A``, ``R``, ``scores`` in ``Scores.extras``.

    Returns:
        :class:`Scores` with ``priority`` ``[B, Hq, Mq, Mk]`` float32.
    """
    if selector not in ("cab", "magnitude"):
        raise ValueError(f"score_stage scores the selectors ('cab', 'magnitude'), got {selector!r}")
    if precision != "fp32":
        raise ValueError(f"the PyTorch score_stage computes in fp32 only, got precision={precision!r}")
    if two_stage:
        raise ValueError(
            "two_stage=True is the Triton predictor's mode; its PyTorch twin is "
            "cab_attention.kernels.reference.two_stage_reference"
        )
    scale = grid.head_dim**-0.5 if scale is None else float(scale)
    logits = S.coarse_logits(qc, kc, scale)
    if selector == "magnitude":
        return Scores(logits, extras={"logits": logits} if keep_intermediates else None)
    d = defaults("cab")
    opts = {"score": d["score"] if score is None else score, "keep": d["keep"] if keep is None else keep,
            "lam": lam, "norm": norm, "hybrid": hybrid, "edges": edges}
    resolve_options("cab", opts)
    prio, demote, extras = cab_priority(logits, grid, **opts)
    return Scores(prio, None, dict(extras, logits=logits) if keep_intermediates else None, demote)


def select_stage(
    scores: Scores | torch.Tensor,
    grid: BlockGrid,
    budget: torch.Tensor,
    *,
    share_kv: bool = False,
    write_mask: bool = True,
    index_width: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Stage 3 in PyTorch: keep the first ``budget`` blocks of each row's order (:func:`rank_order`).

    Args:
        scores: a :class:`Scores` or a priority ``[B, Hq, Mq, Mk]``.
        budget: ``[Mq]`` (or ``[B, H, Mq]``) blocks per row, e.g. :meth:`BlockGrid.budget`.
        share_kv: average the priority over each KV head's query group first (``H = Hkv``).
        write_mask: return the mask (else ``None``).
        index_width: keep only the first ``W`` columns of ``kv_indices``.

    Returns:
        ``(mask [B, H, Mq, Mk] bool or None, kv_num_blocks [B, H, Mq] int32, kv_indices [B, H, Mq, W] int32)``.
    """
    if isinstance(scores, torch.Tensor):
        scores = Scores(scores)
    if share_kv and scores.candidates is not None:
        raise ValueError("share_kv is not supported with two-stage candidates")
    order = rank_rows(scores.priority, grid, scores.demote, share_kv, scores.candidates)
    mask = keep_first(order, budget.long())
    num, idx = kv_layout(mask)
    if index_width is not None:
        idx = idx[..., :index_width].contiguous()
    return (mask if write_mask else None), num, idx

