"""Deprecated: the selection stage lives in :mod:`cab_attention.select` and its option tables in
:mod:`cab_attention.options`. This module re-exports the old names for one release; each access warns."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# old name -> (module, new name)
_MOVED = {
    "COMMON_OPTIONS": ("options", "COMMON_OPTIONS"),
    "SELECTOR_OPTIONS": ("options", "SELECTOR_OPTIONS"),
    "SELECTORS": ("options", "SELECTORS"),
    "SEED_CAB_OPTIONS": ("options", "FORMAN_KEEP_LOWEST_MAXL2"),
    "resolve_options": ("options", "resolve_options"),
    "select_blocks": ("select", "select_blocks"),
    "_row_rank01": ("select", "row_rank01"),
    "_masked_softmax": ("select", "masked_softmax"),
    "_SCORERS": ("select", "SCORERS"),
    "_Context": ("select_scorers", "ScoringContext"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module, new = _MOVED[name]
        warnings.warn(
            f"cab_attention.selectors.{name} is deprecated; use cab_attention.{module}.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f"cab_attention.{module}"), new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_MOVED)
