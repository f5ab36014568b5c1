"""Selector options: the tables of every option, their defaults and checks, and named configurations.

Both selection paths read these tables: the PyTorch path (:func:`cab_attention.select.select_blocks`)
and the Triton predictor (:mod:`cab_attention.kernels`). This module imports nothing of either, so
either may import it.

| selector         | priority                                                                   |
|------------------|----------------------------------------------------------------------------|
| ``dense``        | keeps every causally valid block                                           |
| ``cab``          | curvature of the coarse block graph: the triangle proxy (default) or augmented Forman; keep highest (default) or lowest; mean coarsening (default); ``hybrid`` mixes in the magnitude rank |
| ``magnitude``    | coarse logit ``qc . kc * scale`` (H2O-style heavy hitters at block level)  |
| ``streaming``    | recency: sink + the most recent blocks (StreamingLLM)                      |
| ``random``       | seeded uniform draw                                                        |
| ``antidiagonal`` | XAttention strided antidiagonal block mass                                 |
| ``oracle``       | true block attention mass from full attention (evaluation only)            |
| ``vertical_slash`` | MInference: vertical columns + slash diagonals from the last queries' attention, as block mass |
| ``flexprefill``  | FlexPrefill: per head, query-aware block estimate or vertical-slash, by Jensen-Shannon distance |
| ``cab_graph``    | curvature on a row-softmax (or antidiagonal) graph: two-hop ``A + lam A@A`` (default) or triangle |

``allocation`` (every selector, fixed sparsity) spreads the same total over rows (``"row"``), heads
(``"head"``) or the whole layer (``"layer"``): :mod:`cab_attention.allocation`.

``cab``'s defaults are the configuration a pre-registered ablation picked on an H100 (triangle proxy,
keep highest, mean coarsening); :data:`FORMAN_KEEP_LOWEST_MAXL2` names the original formulation
(augmented Forman curvature, keep the lowest, max-L2 coarsening). Neither beat ``antidiagonal`` there.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

from .allocation import ALLOCATIONS
from .coarsen import COARSEN_METHODS
from .geometry import check_threshold
from .score import TRIANGLE_NORMS

Check = Callable[[str, Any], None]


def choice(*allowed: Any) -> Check:
    """A check that the value is one of ``allowed``."""

    def check(name: str, value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    return check


def number(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A check that the value is a real number (not a bool) in the interval ``lo..hi``."""

    def check(name: str, value: Any) -> None:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok:
            v = float(value)
            ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise ValueError(f"{name} must be a number in {lb}{lo}, {hi}{rb}, got {value!r}")

    return check


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` when it is an int (not a bool) of at least ``minimum``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def positive_or_none(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0):
        raise ValueError(f"{name} must be None or a positive number, got {value!r}")


def _threshold(name: str, value: Any) -> None:
    if value is not None:
        check_threshold(value)


#: Options every selector takes: ``name -> (default, check)``.
COMMON_OPTIONS: dict[str, tuple[Any, Check]] = {
    # How a block of tokens becomes one vector (cab overrides the default with "mean").
    "coarsen": ("max_l2", choice(*COARSEN_METHODS)),
    # One mask per KV head (the priority averaged over its query group) instead of one per query head.
    "share_kv": (False, boolean),
    # Adaptive mode: keep the fewest blocks whose estimated mass reaches the threshold in (0, 1].
    "threshold": (None, _threshold),
    # Attention scale; None is head_dim ** -0.5.
    "scale": (None, positive_or_none),
    "return_diagnostics": (False, boolean),
    # "triton": the fused Triton predictor (cab_attention.kernels; cab, magnitude, dense; fixed sparsity).
    "impl": ("torch", choice("torch", "triton")),
    # Raise ValueError on NaN or inf in q and k. It costs one read of q and k and one host sync; turn it
    # off where the inputs are known to be finite and that cost matters (scripts/gpu_house.py measures it).
    "check_finite": (True, boolean),
    # Budget allocation at the same exact total (cab_attention.allocation); fixed sparsity, torch only.
    "allocation": ("row", choice(*ALLOCATIONS)),
}

#: Each selector's own options: ``selector -> {name -> (default, check)}``; they override the common ones.
SELECTOR_OPTIONS: dict[str, dict[str, tuple[Any, Check]]] = {
    "dense": {},
    "cab": {
        "score": ("triangle", choice("forman", "triangle")),
        "keep": ("highest", choice("lowest", "highest")),
        "coarsen": ("mean", choice(*COARSEN_METHODS)),
        "lam": (0.5, number(0.0, math.inf, hi_open=True)),
        "norm": ("blocks", choice(*TRIANGLE_NORMS)),
        "hybrid": (0.0, number(0.0, 1.0)),
        # "causal": every causally valid block pair is an edge (weight relu(logit), possibly 0).
        # "positive": only pairs with positive affinity are edges; zero-affinity blocks rank after every
        # other valid block (still before non-edges, so budgets stay exact).
        "edges": ("causal", choice("causal", "positive")),
    },
    "magnitude": {},
    "streaming": {},
    "random": {"seed": (0, integer)},
    "antidiagonal": {"stride": (8, integer)},
    "oracle": {},
    "vertical_slash": {"last_q": (64, positive_int)},
    "flexprefill": {
        "last_q": (64, positive_int),
        "tau": (0.1, number(0.0, 1.0)),
        "coarsen": ("mean", choice(*COARSEN_METHODS)),
    },
    "cab_graph": {
        "affinity": ("softmax", choice("softmax", "antidiagonal")),
        "score": ("two_hop", choice("two_hop", "triangle")),
        "keep": ("highest", choice("lowest", "highest")),
        "lam": (0.5, number(0.0, math.inf, hi_open=True)),
        "stride": (8, integer),
        "coarsen": ("mean", choice(*COARSEN_METHODS)),
    },
}

#: The selector names, in table order.
SELECTORS: tuple[str, ...] = tuple(SELECTOR_OPTIONS)

#: The selector that ``select_blocks``, ``sparse_attention``, the modules and ``hf.enable`` use when none is
#: named. Chosen by the pre-registered rule of docs/results.md ("Pre-registered selector search
#: (2026-12-04)", rule 3): no candidate beat ``antidiagonal``, so the default is that best baseline. It
#: kept the most attention among the baselines on SmolLM2 (H100 ablation, 2026-11-25) and retrieved the
#: passkey where ``cab``'s defaults (streaming's blocks in most rows) did not.
DEFAULT_SELECTOR = "antidiagonal"

#: CAB as first formulated: augmented Forman curvature, keep the lowest, max-L2 coarsening.
FORMAN_KEEP_LOWEST_MAXL2: dict[str, Any] = {"score": "forman", "keep": "lowest", "coarsen": "max_l2"}

#: ``cab``'s defaults spelled out: triangle proxy, keep the highest, mean coarsening.
TRIANGLE_KEEP_HIGHEST_MEAN: dict[str, Any] = {"score": "triangle", "keep": "highest", "coarsen": "mean"}

#: Named ``cab`` configurations (option dicts to pass as ``**options``).
CAB_CONFIGS: dict[str, dict[str, Any]] = {
    "forman_keep_lowest_maxl2": FORMAN_KEEP_LOWEST_MAXL2,
    "triangle_keep_highest_mean": TRIANGLE_KEEP_HIGHEST_MEAN,
}

# Old names kept for one release: name -> (new name, value).
_DEPRECATED = {"SEED_CAB_OPTIONS": ("FORMAN_KEEP_LOWEST_MAXL2", FORMAN_KEEP_LOWEST_MAXL2)}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new, value = _DEPRECATED[name]
        warnings.warn(
            f"cab_attention.options.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2
        )
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def option_spec(selector: str) -> dict[str, tuple[Any, Check]]:
    """Every option ``selector`` takes, ``name -> (default, check)``; ``ValueError`` for an unknown name."""
    if selector not in SELECTOR_OPTIONS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
    return {**COMMON_OPTIONS, **SELECTOR_OPTIONS[selector]}


def defaults(selector: str) -> dict[str, Any]:
    """``selector``'s default options."""
    return {name: default for name, (default, _) in option_spec(selector).items()}


def resolve_options(selector: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validate a selector's name and options; return all its options with the defaults filled in.

    Raises ``ValueError`` naming an unknown selector, an unknown option, or a bad value.
    """
    spec = option_spec(selector)
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for selector {selector!r}; it accepts {sorted(spec)}")
    out = {}
    for name, (default, check) in spec.items():
        value = options.get(name, default)
        check(name, value)
        out[name] = value
    return out


def check_stride(stride: int, block_size: int) -> None:
    """``antidiagonal``'s stride must divide the block size."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or block_size % stride:
        raise ValueError(f"stride must be a positive divisor of block_size={block_size}, got {stride!r}")
