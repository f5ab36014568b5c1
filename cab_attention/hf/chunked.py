"""Chunked prefill of a long prompt into a transformers KV cache, under CAB attention.

A one-shot prefill of ``N`` tokens holds every layer's activations for all ``N`` positions at once
(hidden states, MLP intermediates, the logits ``[N, vocab]``). :func:`prefill` feeds the prompt
``chunk_size`` tokens at a time into a ``DynamicCache``: each chunk's queries are the last ``q_len`` of
``kv_len`` cached keys, which the attention function already handles (the library's chunked-prefill
rule: query blocks aligned with key blocks, every chunk selecting over *every* cached key block), so
peak activation memory is bounded by the chunk; the cache itself grows with the prompt, as it must.
Only the last position's logits are computed (``logits_to_keep=1``).

Then ``model.generate`` continues from the cache::

    from cab_attention import hf
    hf.enable(model, selector="cab", sparsity=0.9, block_size=64)
    cache, _ = hf.prefill(model, ids[:, :-1], chunk_size=8192)   # all but the last prompt token
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)   # ``cache=`` in transformers >= 5.2x

``generate`` feeds only the tokens the cache does not hold yet (here the last prompt token), so it must
receive the whole prompt and a cache one token shorter. At sparsity 0 this equals one-shot prefill.
"""

from __future__ import annotations

from typing import Any

import torch

from .enabling import settings_of


def prefill(
    model: Any,
    input_ids: torch.Tensor,
    chunk_size: int = 8192,
    cache: Any = None,
) -> tuple[Any, torch.Tensor]:
    """Feed ``input_ids`` into ``cache`` chunk by chunk.

    Args:
        model: a transformers causal LM after :func:`cab_attention.hf.enable`.
        input_ids: ``[B, N]`` token ids (no padding: every row is ``N`` real tokens).
        chunk_size: tokens per forward call, a positive multiple of the model's CAB ``block_size`` (so
            that every chunk but the last is whole blocks and chunks start on block boundaries when the
            cache does).
        cache: a transformers cache to extend (default: a new ``DynamicCache``).

    Returns:
        ``(cache, last_logits)``: the cache now holding the ``N`` new positions, and the logits of the
        last position ``[B, vocab]`` (float, the model's output dtype).
    """
    settings = settings_of(model)
    if settings is None:
        raise ValueError("prefill needs a model after cab_attention.hf.enable(model, ...)")
    bs = settings.block_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < bs or chunk_size % bs:
        raise ValueError(
            f"chunk_size must be a positive multiple of the model's block_size={bs} (e.g. {8 * bs}), got {chunk_size!r}"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty [B, N] tensor of token ids, got {shape}")
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    # transformers >= 5.2x names the argument ``cache`` (``past_key_values`` is deprecated); older: only the latter.
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    n = input_ids.shape[1]
    last = None
    with torch.no_grad():
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            out = model(input_ids=input_ids[:, s:e], use_cache=True, logits_to_keep=1, **{cache_kw: cache})
            new = getattr(out, "cache", None)
            cache = out.past_key_values if new is None else new
            last = out.logits[:, -1]
            del out
    return cache, last
