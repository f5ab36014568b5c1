"""cab-attention: curvature-aware block-sparse attention for long-context prefill.

Pipeline (one module per stage): :mod:`.coarsen` -> :mod:`.score` -> :mod:`.select` -> :mod:`.execute`.
:mod:`.options` holds the selector option tables and named configurations, :mod:`.selection` the
:class:`BlockSelection` result, :mod:`.modules` drop-in layers, :mod:`.kernels` the Triton predictor and
:mod:`.hf` the transformers integration (imported on first use).
"""

from .execute import BACKENDS, dense_attention, reference_attention, sparse_attention
from .flops import estimate_flops
from .geometry import BlockGrid
from .modules import CABAttention, CABAttentionLayer
from .selection import BlockSelection
from .options import SELECTOR_OPTIONS, SELECTORS
from .select import select_blocks

__all__ = [
    "BACKENDS",
    "SELECTORS",
    "SELECTOR_OPTIONS",
    "BlockGrid",
    "BlockSelection",
    "CABAttention",
    "CABAttentionLayer",
    "dense_attention",
    "estimate_flops",
    "reference_attention",
    "select_blocks",
    "sparse_attention",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The transformers integration imports transformers: load it only when asked for (``cab_attention.hf``).
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
