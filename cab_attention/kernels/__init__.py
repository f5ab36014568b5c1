"""Triton kernels for the CAB predictor (coarsen, score, select) and a compiled CAB forward.

Import-safe without Triton: :data:`HAS_TRITON` says whether the kernels loaded, and
:func:`select_blocks_triton` (what ``select_blocks(..., impl="triton")`` calls) raises ``ValueError``
with the reason when they cannot run. On CPU the kernels run only in Triton's interpreter: set
``TRITON_INTERPRET=1`` before this package is first imported. See ``docs/kernels.md``.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401

    HAS_TRITON = True
    IMPORT_ERROR: Exception | None = None
except Exception as e:  # pragma: no cover - depends on the environment
    HAS_TRITON = False
    IMPORT_ERROR = e

if HAS_TRITON:
    from .coarsen import coarsen_qk
    from .predictor import (
        SUPPORTED_SELECTORS,
        Scores,
        block_mask,
        budget_for,
        candidate_budget,
        check_runnable,
        coarsen_stage,
        flex_blocks,
        predict,
        score_stage,
        select_blocks_triton,
        select_stage,
        unavailable_reason,
    )
    from .antidiagonal import antidiagonal_mass, predict_antidiagonal
    from .graphs import GraphCache, graph_key, predict_graphed
    from .radix_select import radix_select_rows
    from .scores import PRECISIONS, affinity, redundancy_scores, two_stage_scores
    from .topk import select_rows
else:  # pragma: no cover

    def select_blocks_triton(*args, **kwargs):
        raise ValueError(f"impl='triton' needs the triton package, which failed to import: {IMPORT_ERROR}")

    def predict(*args, **kwargs):
        raise ValueError(f"cab_attention.kernels.predict needs the triton package, which failed to import: {IMPORT_ERROR}")

    def unavailable_reason(device, dtype=None):
        return f"triton is not importable ({IMPORT_ERROR})"
