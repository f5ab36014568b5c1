"""Stage 3, select: per query-block row, which key blocks to keep; and :func:`select_blocks`, the whole
PyTorch predictor (coarsen -> score -> select) with the one dispatch to the Triton kernels.

Every row ranks its key blocks in one total order:

1. the forced blocks (sink block 0 and the diagonal block), then
2. the other causally valid blocks by *priority*, highest first, ties to the more recent block
   (the larger key-block index); a selector may *demote* some valid blocks behind all the others
   (``cab`` with ``edges="positive"`` demotes zero-affinity blocks), then
3. non-edges (causally invalid blocks), which no budget ever reaches because ``k_i <= v_i``.

Fixed-sparsity mode keeps the first ``k_i`` blocks of that order (:meth:`BlockGrid.budget`). Adaptive
mode keeps the shortest prefix whose share of the row's *mass* (a non-negative weight per block,
normalised over the row's valid blocks) reaches the threshold. A NaN priority ranks below every finite one.

A selector turns q and k into a *priority* per block edge (higher is kept first) and, optionally, a
*mass* per block edge (its estimate of the row's attention share, used by adaptive mode; the default
is the softmax of the coarse logits over the row's valid blocks). Ranking, budgets, the forced blocks
and the tie-break are shared, so selectors differ only in their scores. Options and their defaults:
:mod:`cab_attention.options`.

The stage functions :func:`coarsen_stage`, :func:`score_stage` and :func:`select_stage` have the names,
arguments and outputs of the Triton stages in :mod:`cab_attention.kernels.predictor`, so a benchmark can
time either side stage by stage; :func:`select_blocks` is built from the same code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .options import DEFAULT_SELECTOR
from . import score as S
from .allocation import allocate
from .coarsen import coarsen
from .geometry import BlockGrid, check_block_size, check_finite, check_qkv, check_sparsity
from .options import check_stride, defaults, resolve_options
from .selection import BlockSelection, dense_selection, kv_layout

__all__ = [
    "Scores",
    "adaptive_budget",
    "cab_priority",
    "coarsen_stage",
    "keep_first",
    "kv_layout",
    "rank_order",
    "row_rank01",
    "score_stage",
    "select_blocks",
    "select_stage",
]


# ------------------------------------------------------------------------------------- rank and budget


def rank_order(
    priority: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor, demote: torch.Tensor | None = None
) -> torch.Tensor:
    """The total order of each row, as key-block indices.

    Args:
        priority: ``[B, H, Mq, Mk]`` float, higher is kept first.
        valid, forced: ``[Mq, Mk]`` bool (or broadcastable to ``priority``).
        demote: optional ``[B, H, Mq, Mk]`` bool: valid, non-forced blocks that rank after every other
            valid block (still before non-edges, so budgets stay exact).

    Returns:
        ``[B, H, Mq, Mk]`` int64: ``order[..., r]`` is the key block ranked ``r``-th.
    """
    mk = priority.shape[-1]
    pr = torch.nan_to_num(priority.float(), nan=float("-inf"))
    tier = 2 * valid.to(torch.int8) + forced.to(torch.int8)  # forced 3, valid 2, non-edge 0
    if demote is not None:
        tier = tier - (demote & valid & ~forced).to(torch.int8)  # demoted 1
    # Reverse the columns so that a stable sort breaks ties toward the larger original index.
    pr_rev = pr.flip(-1)
    tier_rev = tier.flip(-1).expand_as(pr_rev)
    by_priority = torch.sort(pr_rev, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier_rev.gather(-1, by_priority), dim=-1, descending=True, stable=True).indices
    return (mk - 1) - by_priority.gather(-1, by_tier)


def keep_first(order: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mask of the first ``k`` blocks of each row's order.

    Args: order ``[B, H, Mq, Mk]`` int64; k broadcastable to ``[B, H, Mq]``. Returns ``[B, H, Mq, Mk]`` bool.
    """
    mk = order.shape[-1]
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(mk, device=order.device).expand_as(order))
    return ranks < k[..., None]


def adaptive_budget(
    order: torch.Tensor, mass: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Fewest blocks, in rank order, whose share of the row's mass reaches ``threshold``.

    Args:
        order: ``[B, H, Mq, Mk]`` from :func:`rank_order`; mass: ``[B, H, Mq, Mk]`` non-negative;
        valid, forced: ``[Mq, Mk]`` bool.

    Returns:
        ``[B, H, Mq]`` int64, at least the number of forced blocks and at most the valid ones.
    """
    w = torch.where(valid, mass.float().clamp_min(0.0), torch.zeros((), device=mass.device))
    total = w.sum(-1, keepdim=True)
    share = w / total.clamp_min(1e-30)
    cum = share.gather(-1, order).cumsum(-1)
    # Count the prefixes still short of the threshold; the next block reaches it.
    k = (cum < threshold - 1e-6).sum(-1) + 1
    n_forced = (forced & valid).sum(-1)
    n_valid = valid.sum(-1)
    return torch.minimum(torch.maximum(k, n_forced), n_valid)


def row_rank01(p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each valid entry within its row, scaled to ``[0, 1]`` (1 = highest priority).

    Args: p ``[..., Mq, Mk]``; valid ``[Mq, Mk]`` bool. Returns float32 of ``p``'s shape (invalid entries
    get negative ranks). NaN ranks below every number, as in :func:`rank_order`.
    """
    # Invalid entries sort below everything, so a valid -inf still ranks above them.
    big = float(torch.finfo(torch.float32).max)
    p = torch.nan_to_num(p.double(), nan=-2 * big, posinf=big, neginf=-big)  # finite in float64
    key = torch.where(valid, p, torch.full_like(p, float("-inf")))
    ranks = torch.argsort(torch.argsort(key, dim=-1, stable=True), dim=-1, stable=True).float()
    n_valid = valid.sum(-1, keepdim=True).float()
    # Invalid entries sort first, so shift ranks down by their count.
    ranks = ranks - (valid.shape[-1] - n_valid)
    return ranks / (n_valid - 1).clamp_min(1)


def masked_softmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax of each row of ``x`` ``[B, H, Mq, Mk]`` over its ``valid`` ``[Mq, Mk]`` entries."""
    return x.masked_fill(~valid, float("-inf")).softmax(-1)


def _group_reduce(x: torch.Tensor, grid: BlockGrid, how: str) -> torch.Tensor:
    """``[B, Hq, ...]`` -> ``[B, Hkv, ...]``: mean (priority, mass) or all (demotion) over each KV group."""
    y = x.reshape(grid.batch, grid.kv_heads, grid.group, *x.shape[2:])
    return y.mean(2) if how == "mean" else y.all(2)


# ---------------------------------------------------------------------------------------------- stages


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


def _rank_rows(prio: torch.Tensor, grid: BlockGrid, demote: torch.Tensor | None, share_kv: bool,
               candidates: torch.Tensor | None = None) -> torch.Tensor:
    dev = prio.device
    valid, forced = grid.valid(dev), grid.forced(dev)
    if share_kv:
        prio = _group_reduce(prio, grid, "mean")
        demote = None if demote is None else _group_reduce(demote, grid, "all")
    if candidates is not None:
        valid = valid & candidates
    return rank_order(prio, valid, forced, demote)


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
    order = _rank_rows(scores.priority, grid, scores.demote, share_kv, scores.candidates)
    mask = keep_first(order, budget.long())
    num, idx = kv_layout(mask)
    if index_width is not None:
        idx = idx[..., :index_width].contiguous()
    return (mask if write_mask else None), num, idx


# ------------------------------------------------------------------------------------------- selectors


@dataclass
class _Context:
    """What a selector's scorer sees; the coarse vectors and logits are computed once, when first asked."""

    q: torch.Tensor
    k: torch.Tensor
    grid: BlockGrid
    scale: float
    opts: dict[str, Any]
    diag: dict[str, Any] = field(default_factory=dict)
    demote: torch.Tensor | None = None
    _cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def coarse(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "qc" not in self._cache:
            self._cache["qc"], self._cache["kc"] = coarsen_stage(self.q, self.k, self.grid, self.opts["coarsen"])
            self.diag["qc"], self.diag["kc"] = self._cache["qc"], self._cache["kc"]
        return self._cache["qc"], self._cache["kc"]

    def logits(self) -> torch.Tensor:
        if "logits" not in self._cache:
            qc, kc = self.coarse()
            self._cache["logits"] = S.coarse_logits(qc, kc, self.scale)
            self.diag["logits"] = self._cache["logits"]
        return self._cache["logits"]


Scorer = Callable[[_Context], "tuple[torch.Tensor, torch.Tensor | None]"]


def _sel_cab(ctx: _Context):
    o = ctx.opts
    prio, ctx.demote, extras = cab_priority(
        ctx.logits(), ctx.grid, score=o["score"], keep=o["keep"], lam=o["lam"], norm=o["norm"],
        hybrid=o["hybrid"], edges=o["edges"],
    )
    ctx.diag.update(extras)
    return prio, None


def _sel_magnitude(ctx: _Context):
    logits = ctx.logits()
    ctx.diag["scores"] = logits
    return logits, None


def _sel_streaming(ctx: _Context):
    g = ctx.grid
    j = torch.arange(g.num_kv_blocks, device=ctx.q.device, dtype=torch.float32)
    return j.expand(g.batch, g.q_heads, g.num_q_blocks, g.num_kv_blocks), None


def _sel_random(ctx: _Context):
    g = ctx.grid
    gen = torch.Generator(device="cpu").manual_seed(int(ctx.opts["seed"]))
    prio = torch.rand(g.batch, g.q_heads, g.num_q_blocks, g.num_kv_blocks, generator=gen).to(ctx.q.device)
    return prio, None


def _sel_antidiagonal(ctx: _Context):
    mass = S.antidiagonal_mass(ctx.q, ctx.k, ctx.grid, ctx.scale, stride=int(ctx.opts["stride"]))
    ctx.diag["scores"] = mass
    return mass, mass


def _sel_oracle(ctx: _Context):
    mass = S.oracle_mass(ctx.q, ctx.k, ctx.grid, ctx.scale)
    ctx.diag["scores"] = mass
    return mass, mass


def _sel_vertical_slash(ctx: _Context):
    p, pos = S.last_query_attention(ctx.q, ctx.k, ctx.grid, ctx.scale, int(ctx.opts["last_q"]))
    mass = S.vertical_slash_mass(p, pos, ctx.grid)
    ctx.diag["scores"] = mass
    return mass, mass


def _sel_flexprefill(ctx: _Context):
    p, pos = S.last_query_attention(ctx.q, ctx.k, ctx.grid, ctx.scale, int(ctx.opts["last_q"]))
    query_aware = S.softmax_affinity(ctx.logits(), ctx.grid.valid(ctx.q.device))
    mass, use_vs = S.flexprefill_mass(p, pos, query_aware, ctx.grid, float(ctx.opts["tau"]))
    ctx.diag.update(scores=mass, use_vertical_slash=use_vs)
    return mass, mass


def _sel_cab_graph(ctx: _Context):
    o, valid = ctx.opts, ctx.grid.valid(ctx.q.device)
    if o["affinity"] == "softmax":
        a = S.softmax_affinity(ctx.logits(), valid)
    else:
        a = S.row_shares(S.antidiagonal_mass(ctx.q, ctx.k, ctx.grid, ctx.scale, stride=int(o["stride"])), valid)
    r = S.redundancy(a, ctx.grid)
    lam = float(o["lam"])
    f = S.two_hop(a, r, lam) if o["score"] == "two_hop" else S.triangle_proxy(a, r, lam=lam, norm="none")
    ctx.diag.update(A=a, R=r, scores=f)
    return (-f if o["keep"] == "lowest" else f), a


#: Each selector's scorer: context -> (priority ``[B, Hq, Mq, Mk]``, mass or ``None``).
SCORERS: dict[str, Scorer] = {
    "cab": _sel_cab,
    "magnitude": _sel_magnitude,
    "streaming": _sel_streaming,
    "random": _sel_random,
    "antidiagonal": _sel_antidiagonal,
    "oracle": _sel_oracle,
    "vertical_slash": _sel_vertical_slash,
    "flexprefill": _sel_flexprefill,
    "cab_graph": _sel_cab_graph,
}


def _select_triton(q, k, *, selector, sparsity, block_size, causal, opts) -> BlockSelection:
    """The one dispatch to :mod:`cab_attention.kernels`, imported here, lazily: importing it compiles
    nothing but needs Triton, and the kernels import this module."""
    from .kernels import select_blocks_triton

    return select_blocks_triton(
        q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=causal, opts=opts
    )


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    selector: str = DEFAULT_SELECTOR,
    sparsity: float = 0.9,
    block_size: int = 64,
    causal: bool = True,
    window: int | None = None,
    **options: Any,
) -> BlockSelection:
    """Choose the key blocks each query block attends to.

    Args:
        q: ``[B, Hq, Nq, D]`` queries (the last ``Nq`` positions when ``Nq < Nk``).
        k: ``[B, Hkv, Nk, D]`` keys, ``Hq % Hkv == 0``.
        selector: one of :data:`cab_attention.options.SELECTORS`.
        sparsity: in ``[0, 1)``; row ``i`` with ``v_i`` valid blocks keeps exactly
            ``min(v_i, max(2, ceil((1 - sparsity) * v_i)))`` (:meth:`BlockGrid.budget`), sink and diagonal
            included.
        block_size: a power of two; tokens per block on both axes.
        causal: causal block graph and attention.
        window: a sliding window in tokens (query ``p`` sees keys ``p - window < j <= p``; causal only):
            selection happens inside it (:class:`BlockGrid` ``window``: valid blocks, a window-local sink,
            budgets over the window's blocks); torch only.
        **options: ``coarsen`` (``"max_l2"``, ``"mean"``, ``"max"``), ``share_kv`` (one mask per KV head),
            ``threshold`` (adaptive mode: keep the fewest blocks whose estimated mass reaches it; then
            ``sparsity`` is not used), ``scale`` (default ``D**-0.5``), ``return_diagnostics``,
            ``check_finite`` (default ``True``: ``ValueError`` on NaN or inf in q or k, at the cost of a
            read of both and a host sync), ``impl`` (``"torch"``, or ``"triton"`` for the fused kernels of
            :mod:`cab_attention.kernels`: ``cab``/``magnitude``/``dense``, fixed sparsity, CUDA or
            ``TRITON_INTERPRET=1``; ``ValueError`` elsewhere), ``allocation`` (``"row"``, ``"head"``,
            ``"layer"``: the same exact total spread by estimated mass, :mod:`cab_attention.allocation`;
            fixed sparsity, torch only), and the selector's own (see
            :data:`cab_attention.options.SELECTOR_OPTIONS`).

    Returns:
        A :class:`BlockSelection`. Fewer than ``block_size`` queries give the dense selection.
    """
    check_qkv(q, k)
    check_block_size(block_size)
    check_sparsity(sparsity)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    opts = resolve_options(selector, options)
    # Checked here, not only in the scorer, so that a bad stride fails even where the dense path
    # (fewer queries than one block) never calls the scorer.
    if selector == "antidiagonal" or (selector == "cab_graph" and opts["affinity"] == "antidiagonal"):
        check_stride(opts["stride"], block_size)
    if opts["allocation"] != "row" and (opts["threshold"] is not None or opts["impl"] == "triton"):
        raise ValueError(
            f"allocation={opts['allocation']!r} needs fixed sparsity with impl='torch' "
            "(threshold=None; the Triton path allocates per row)"
        )
    if opts["check_finite"]:
        check_finite(q=q, k=k)
    if opts["impl"] == "triton" and window is not None:
        raise ValueError("impl='triton' selects over the whole causal range; use impl='torch' with window=")
    if opts["impl"] == "triton":
        return _select_triton(q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=causal,
                              opts=opts)
    grid = BlockGrid.of(q, k, block_size, causal, window)
    dev = q.device
    share_kv = opts["share_kv"]

    if selector == "dense" or grid.q_len < block_size:
        sel = dense_selection(grid, selector, share_kv, dev)
        if opts["return_diagnostics"]:
            sel.diagnostics = {"mask": sel.mask}
        return sel

    scale = float(opts["scale"]) if opts["scale"] is not None else grid.head_dim**-0.5
    ctx = _Context(q, k, grid, scale, opts)
    prio, mass = SCORERS[selector](ctx)
    threshold = opts["threshold"]
    order = _rank_rows(prio, grid, ctx.demote, share_kv)
    if threshold is None and opts["allocation"] == "row":
        budget = grid.budget(sparsity, dev)
    elif threshold is None:
        if mass is None:
            mass = masked_softmax(ctx.logits(), grid.valid(dev))
        if share_kv:
            mass = _group_reduce(mass, grid, "mean")
        budget = allocate(opts["allocation"], mass, grid, sparsity)
    else:
        if mass is None:
            mass = masked_softmax(ctx.logits(), grid.valid(dev))
        if share_kv:
            mass = _group_reduce(mass, grid, "mean")
        budget = adaptive_budget(order, mass, grid.valid(dev), grid.forced(dev), float(threshold))
    mask = keep_first(order, budget)
    num, idx = kv_layout(mask)
    diag = None
    if opts["return_diagnostics"]:
        if share_kv:
            prio = _group_reduce(prio, grid, "mean")
        diag = dict(ctx.diag, priority=prio, order=order, mask=mask, budget=budget)
        if mass is not None:
            diag["mass"] = mass
    return BlockSelection(mask, num, idx, grid, selector, share_kv, diag)


# Old names kept for one release.
def __getattr__(name: str) -> Any:
    if name == "fixed_budget":
        warnings.warn("cab_attention.select.fixed_budget is deprecated; use BlockGrid.budget",
                      DeprecationWarning, stacklevel=2)
        return lambda grid, sparsity, device: grid.budget(sparsity, device)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
