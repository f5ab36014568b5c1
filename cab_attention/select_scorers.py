"""Each selector's scorer (:data:`SCORERS`): q and k to a *priority* per block edge (higher is kept
first) and, optionally, a *mass* per block edge (its estimate of the row's attention share, used by
adaptive mode and by budget allocation; ``None`` leaves it to :func:`cab_attention.select.select_blocks`,
whose default is the softmax of the coarse logits over the row's valid blocks). Ranking, budgets, the
forced blocks and the tie-break are shared (:mod:`cab_attention.select_order`), so selectors differ only
in their scores. Options and their defaults: :mod:`cab_attention.options`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import score as S
from .geometry import BlockGrid
from .select_stages import cab_priority, coarsen_stage

__all__ = ["SCORERS", "Scorer", "ScoringContext"]


@dataclass
class ScoringContext:
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


Scorer = Callable[[ScoringContext], "tuple[torch.Tensor, torch.Tensor | None]"]


def _sel_cab(ctx: ScoringContext):
    o = ctx.opts
    prio, ctx.demote, extras = cab_priority(
        ctx.logits(), ctx.grid, score=o["score"], keep=o["keep"], lam=o["lam"], norm=o["norm"],
        hybrid=o["hybrid"], edges=o["edges"],
    )
    ctx.diag.update(extras)
    return prio, None


def _sel_magnitude(ctx: ScoringContext):
    logits = ctx.logits()
    ctx.diag["scores"] = logits
    return logits, None


def _sel_streaming(ctx: ScoringContext):
    g = ctx.grid
    j = torch.arange(g.num_kv_blocks, device=ctx.q.device, dtype=torch.float32)
    return j.expand(g.batch, g.q_heads, g.num_q_blocks, g.num_kv_blocks), None


def _sel_random(ctx: ScoringContext):
    g = ctx.grid
    gen = torch.Generator(device="cpu").manual_seed(int(ctx.opts["seed"]))
    prio = torch.rand(g.batch, g.q_heads, g.num_q_blocks, g.num_kv_blocks, generator=gen).to(ctx.q.device)
    return prio, None


def _sel_antidiagonal(ctx: ScoringContext):
    mass = S.antidiagonal_mass(ctx.q, ctx.k, ctx.grid, ctx.scale, stride=int(ctx.opts["stride"]))
    ctx.diag["scores"] = mass
    return mass, mass


def _sel_oracle(ctx: ScoringContext):
    mass = S.oracle_mass(ctx.q, ctx.k, ctx.grid, ctx.scale)
    ctx.diag["scores"] = mass
    return mass, mass


def _sel_vertical_slash(ctx: ScoringContext):
    p, pos = S.last_query_attention(ctx.q, ctx.k, ctx.grid, ctx.scale, int(ctx.opts["last_q"]))
    mass = S.vertical_slash_mass(p, pos, ctx.grid)
    ctx.diag["scores"] = mass
    return mass, mass


def _sel_flexprefill(ctx: ScoringContext):
    p, pos = S.last_query_attention(ctx.q, ctx.k, ctx.grid, ctx.scale, int(ctx.opts["last_q"]))
    query_aware = S.softmax_affinity(ctx.logits(), ctx.grid.valid(ctx.q.device))
    mass, use_vs = S.flexprefill_mass(p, pos, query_aware, ctx.grid, float(ctx.opts["tau"]))
    ctx.diag.update(scores=mass, use_vertical_slash=use_vs)
    return mass, mass


def _sel_cab_graph(ctx: ScoringContext):
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

