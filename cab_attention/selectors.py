"""Selectors: every method on the same pipeline (coarsen -> score -> rank -> exact budget).

A selector turns q and k into a *priority* per block edge (higher is kept first) and, optionally, a
*mass* per block edge (its estimate of the row's attention share, used by adaptive mode; the default
is the softmax of the coarse logits over the row's valid blocks). Ranking, budgets, the forced sink and
diagonal blocks and the tie-break are shared (:mod:`cab_attention.select`), so selectors differ only
in their scores.

| selector       | priority                                                             |
|----------------|----------------------------------------------------------------------|
| ``dense``      | keeps every causally valid block                                     |
| ``cab``        | curvature: the triangle proxy (default) or augmented Forman; keep highest (default) or lowest; mean coarsening by default (the pre-registered ablation's pick, docs/results.md; the seed's configuration is ``SEED_CAB_OPTIONS``); ``hybrid`` mixes in the magnitude rank |
| ``magnitude``  | coarse logit ``qc . kc * scale`` (H2O-style heavy hitters at block level) |
| ``streaming``  | recency: sink + the most recent blocks (StreamingLLM)                 |
| ``random``     | seeded uniform draw                                                  |
| ``antidiagonal`` | XAttention strided antidiagonal block mass                          |
| ``oracle``     | true block attention mass from full attention (evaluation only)      |
| ``vertical_slash`` | MInference: vertical columns + slash diagonals from the last queries' attention, as block mass |
| ``flexprefill`` | FlexPrefill: per head, query-aware block estimate or vertical-slash, by Jensen-Shannon distance |
| ``cab_graph``  | curvature on a row-softmax (or antidiagonal) graph: two-hop ``A + lam A@A`` (default) or triangle |

``allocation`` (every selector, fixed sparsity) spreads the same total over rows (``"row"``), heads
(``"head"``) or the whole layer (``"layer"``): :mod:`cab_attention.allocation`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import score as S
from .allocation import ALLOCATIONS, allocate
from .coarsen import COARSEN_METHODS, coarsen
from .geometry import BlockGrid, check_block_size, check_qkv, check_sparsity, check_threshold
from .select import adaptive_budget, keep_first, kv_layout, rank_order
from .selection import BlockSelection


def _choice(*allowed):
    def check(name, value):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    return check


def _number(lo, hi, lo_open=False, hi_open=False):
    def check(name, value):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok:
            v = float(value)
            ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise ValueError(f"{name} must be a number in {lb}{lo}, {hi}{rb}, got {value!r}")

    return check


def _boolean(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _integer(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _scale(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0):
        raise ValueError(f"{name} must be None or a positive number, got {value!r}")


# Options every selector takes: (default, check).
COMMON_OPTIONS: dict[str, tuple[Any, Callable]] = {
    "coarsen": ("max_l2", _choice(*COARSEN_METHODS)),
    "share_kv": (False, _boolean),
    "threshold": (None, lambda n, v: v is None or check_threshold(v)),
    "scale": (None, _scale),
    "return_diagnostics": (False, _boolean),
    # "triton": the fused Triton predictor (cab_attention.kernels; cab, magnitude, dense; fixed sparsity).
    "impl": ("torch", _choice("torch", "triton")),
    # Budget allocation at the same exact total (cab_attention.allocation); fixed sparsity only.
    "allocation": ("row", _choice(*ALLOCATIONS)),
}

SELECTOR_OPTIONS: dict[str, dict[str, tuple[Any, Callable]]] = {
    "dense": {},
    # cab's defaults are the configuration the pre-registered ablation picked (docs/results.md,
    # H100 2026-11-25): triangle proxy, keep highest, mean coarsening. The seed's configuration is
    # SEED_CAB_OPTIONS. Neither beat the antidiagonal baseline.
    "cab": {
        "score": ("triangle", _choice("forman", "triangle")),
        "keep": ("highest", _choice("lowest", "highest")),
        "coarsen": ("mean", _choice(*COARSEN_METHODS)),
        "lam": (0.5, _number(0.0, math.inf, hi_open=True)),
        "norm": ("blocks", _choice(*S.TRIANGLE_NORMS)),
        "hybrid": (0.0, _number(0.0, 1.0)),
        # "causal": every causally valid block pair is an edge (weight relu(logit), possibly 0).
        # "positive": only pairs with positive affinity are edges, as in the seed's toy graph (which
        # scores non-edges 1000 so keep-lowest never reaches them); zero-affinity blocks rank last.
        "edges": ("causal", _choice("causal", "positive")),
    },
    "magnitude": {},
    "streaming": {},
    "random": {"seed": (0, _integer)},
    "antidiagonal": {"stride": (8, _integer)},
    "oracle": {},
    "vertical_slash": {"last_q": (64, _positive_int)},
    "flexprefill": {
        "last_q": (64, _positive_int),
        "tau": (0.1, _number(0.0, 1.0)),
        "coarsen": ("mean", _choice(*COARSEN_METHODS)),
    },
    "cab_graph": {
        "affinity": ("softmax", _choice("softmax", "antidiagonal")),
        "score": ("two_hop", _choice("two_hop", "triangle")),
        "keep": ("highest", _choice("lowest", "highest")),
        "lam": (0.5, _number(0.0, math.inf, hi_open=True)),
        "stride": (8, _integer),
        "coarsen": ("mean", _choice(*COARSEN_METHODS)),
    },
}
SELECTORS = tuple(SELECTOR_OPTIONS)

#: The seed's CAB (SEED.md): augmented Forman curvature, keep the lowest, max-L2 coarsening.
SEED_CAB_OPTIONS: dict[str, Any] = {"score": "forman", "keep": "lowest", "coarsen": "max_l2"}


@dataclass
class _Context:
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
            g = self.grid
            method = self.opts["coarsen"]
            self._cache["qc"] = coarsen(self.q, g.block_size, method, pad_front=g.q_pad_front)
            self._cache["kc"] = coarsen(self.k, g.block_size, method)
            self.diag["qc"], self.diag["kc"] = self._cache["qc"], self._cache["kc"]
        return self._cache["qc"], self._cache["kc"]

    def logits(self) -> torch.Tensor:
        if "logits" not in self._cache:
            qc, kc = self.coarse()
            self._cache["logits"] = S.coarse_logits(qc, kc, self.scale)
            self.diag["logits"] = self._cache["logits"]
        return self._cache["logits"]

    def valid(self) -> torch.Tensor:
        return self.grid.valid(self.q.device)


def _masked_softmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~valid, float("-inf")).softmax(-1)


def _row_rank01(p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each valid entry within its row, scaled to [0, 1] (1 = highest priority)."""
    # NaN ranks below every number (as in select.rank_order); invalid entries sort below everything,
    # so a valid -inf still ranks above them.
    big = float(torch.finfo(torch.float32).max)
    p = torch.nan_to_num(p.double(), nan=-2 * big, posinf=big, neginf=-big)  # finite in float64
    key = torch.where(valid, p, torch.full_like(p, float("-inf")))
    ranks = torch.argsort(torch.argsort(key, dim=-1, stable=True), dim=-1, stable=True).float()
    n_valid = valid.sum(-1, keepdim=True).float()
    # Invalid entries sort first, so shift ranks down by their count.
    ranks = ranks - (valid.shape[-1] - n_valid)
    return ranks / (n_valid - 1).clamp_min(1)


def _sel_cab(ctx: _Context):
    o = ctx.opts
    valid = ctx.valid()
    logits = ctx.logits()
    a = S.affinity(logits, valid)
    r = S.redundancy(a, ctx.grid)
    if o["score"] == "forman":
        f = S.augmented_forman(a, r)
    else:
        f = S.triangle_proxy(a, r, lam=float(o["lam"]), norm=o["norm"])
    ctx.diag.update(A=a, R=r, scores=f)
    if o["edges"] == "positive":
        ctx.demote = a <= 0
    prio = -f if o["keep"] == "lowest" else f
    w = float(o["hybrid"])
    if w > 0:
        prio = (1 - w) * _row_rank01(prio, valid) + w * _row_rank01(logits, valid)
    return prio, None


def _sel_magnitude(ctx: _Context):
    logits = ctx.logits()
    ctx.diag["scores"] = logits
    return logits, None


def _sel_streaming(ctx: _Context):
    g = ctx.grid
    j = torch.arange(g.num_kv_blocks, device=ctx.q.device, dtype=torch.float32)
    prio = j.expand(g.batch, g.q_heads, g.num_q_blocks, g.num_kv_blocks)
    return prio, None


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
    query_aware = S.softmax_affinity(ctx.logits(), ctx.valid())
    mass, use_vs = S.flexprefill_mass(p, pos, query_aware, ctx.grid, float(ctx.opts["tau"]))
    ctx.diag.update(scores=mass, use_vertical_slash=use_vs)
    return mass, mass


def _sel_cab_graph(ctx: _Context):
    o, valid = ctx.opts, ctx.valid()
    if o["affinity"] == "softmax":
        a = S.softmax_affinity(ctx.logits(), valid)
    else:
        a = S.row_shares(S.antidiagonal_mass(ctx.q, ctx.k, ctx.grid, ctx.scale, stride=int(o["stride"])), valid)
    r = S.redundancy(a, ctx.grid)
    lam = float(o["lam"])
    f = S.two_hop(a, r, lam) if o["score"] == "two_hop" else S.triangle_proxy(a, r, lam=lam, norm="none")
    ctx.diag.update(A=a, R=r, scores=f)
    return (-f if o["keep"] == "lowest" else f), a


_SCORERS = {
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


def resolve_options(selector: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validate a selector's name and options; return all options with defaults filled in."""
    if selector not in SELECTOR_OPTIONS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
    spec = {**COMMON_OPTIONS, **SELECTOR_OPTIONS[selector]}
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for selector {selector!r}; it accepts {sorted(spec)}"
        )
    out = {}
    for name, (default, check) in spec.items():
        value = options.get(name, default)
        check(name, value)
        out[name] = value
    return out


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    selector: str = "cab",
    sparsity: float = 0.9,
    block_size: int = 64,
    causal: bool = True,
    **options: Any,
) -> BlockSelection:
    """Choose the key blocks each query block attends to.

    Args:
        q: ``[B, Hq, Nq, D]`` queries (the last ``Nq`` positions when ``Nq < Nk``).
        k: ``[B, Hkv, Nk, D]`` keys, ``Hq % Hkv == 0``.
        selector: one of :data:`SELECTORS`.
        sparsity: in ``[0, 1)``; row ``i`` with ``v_i`` valid blocks keeps exactly
            ``min(v_i, max(2, ceil((1 - sparsity) * v_i)))``, sink and diagonal included.
        block_size: a power of two; tokens per block on both axes.
        causal: causal block graph and attention.
        **options: ``coarsen`` (``"max_l2"``, ``"mean"``, ``"max"``), ``share_kv`` (one mask per KV head),
            ``threshold`` (adaptive mode: keep the fewest blocks whose estimated mass reaches it; then
            ``sparsity`` is not used), ``scale`` (default ``D**-0.5``), ``return_diagnostics``,
            ``impl`` (``"torch"``, or ``"triton"`` for the fused kernels of :mod:`cab_attention.kernels`:
            ``cab``/``magnitude``/``dense``, fixed sparsity, CUDA or ``TRITON_INTERPRET=1``; ``ValueError``
            elsewhere), ``allocation`` (``"row"``, ``"head"``, ``"layer"``: the same exact total spread
            by estimated mass, :mod:`cab_attention.allocation`; fixed sparsity, torch only), and the
            selector's own (see :data:`SELECTOR_OPTIONS`).

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
    uses_stride = selector == "antidiagonal" or (selector == "cab_graph" and opts["affinity"] == "antidiagonal")
    if uses_stride and (opts["stride"] < 1 or block_size % opts["stride"]):
        raise ValueError(f"stride must be a positive divisor of block_size={block_size}, got {opts['stride']!r}")
    if opts["allocation"] != "row" and (opts["threshold"] is not None or opts["impl"] == "triton"):
        raise ValueError(
            f"allocation={opts['allocation']!r} needs fixed sparsity with impl='torch' "
            "(threshold=None; the Triton path allocates per row)"
        )
    if opts["impl"] == "triton":
        from .kernels import select_blocks_triton

        return select_blocks_triton(
            q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=causal, opts=opts
        )
    grid = BlockGrid.of(q, k, block_size, causal)
    dev = q.device
    valid, forced = grid.valid(dev), grid.forced(dev)
    heads = grid.kv_heads if opts["share_kv"] else grid.q_heads
    shape = (grid.batch, heads, grid.num_q_blocks, grid.num_kv_blocks)
    scale = float(opts["scale"]) if opts["scale"] is not None else grid.head_dim**-0.5

    if selector == "dense" or grid.q_len < block_size:
        mask = valid.expand(shape).clone()
        num, idx = kv_layout(mask)
        diag = {"mask": mask} if opts["return_diagnostics"] else None
        return BlockSelection(mask, num, idx, grid, selector, opts["share_kv"], diag)

    ctx = _Context(q, k, grid, scale, opts)
    prio, mass = _SCORERS[selector](ctx)
    if (opts["threshold"] is not None or opts["allocation"] != "row") and mass is None:
        mass = _masked_softmax(ctx.logits(), valid)
    demote = ctx.demote
    if opts["share_kv"]:
        b, hkv, g = grid.batch, grid.kv_heads, grid.group
        prio = prio.reshape(b, hkv, g, *prio.shape[2:]).mean(2)
        if mass is not None:
            mass = mass.reshape(b, hkv, g, *mass.shape[2:]).mean(2)
        if demote is not None:
            demote = demote.reshape(b, hkv, g, *demote.shape[2:]).all(2)
    order = rank_order(prio, valid, forced, demote)
    if opts["threshold"] is None:
        if opts["allocation"] == "row":
            budget = grid.budget(sparsity, dev)
        else:
            budget = allocate(opts["allocation"], mass, grid, sparsity)
    else:
        budget = adaptive_budget(order, mass, valid, forced, float(opts["threshold"]))
    mask = keep_first(order, budget)
    num, idx = kv_layout(mask)
    diag = None
    if opts["return_diagnostics"]:
        diag = dict(ctx.diag, priority=prio, order=order, mask=mask, budget=budget)
        if mass is not None:
            diag["mass"] = mass
    return BlockSelection(mask, num, idx, grid, selector, opts["share_kv"], diag)
