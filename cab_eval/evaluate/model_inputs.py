"""What an evaluation reads: disjoint corpus windows of token ids, and the model that reads them.

The windows are the shared definition of :func:`cab_eval.evaluate.text.haystack_windows` (seeded choice,
kept in corpus order; the Paul Graham essays unless a corpus is given), optionally led by BOS; the model is
SmolLM2 by default or a local model folder / GGUF file, float32 on CPU and bfloat16 on CUDA. Shared by
``cab eval recall`` and ``cab eval ppl``.
"""

from __future__ import annotations

from pathlib import Path

import torch


def text_windows(tokenizer, n_windows: int, length: int, seed: int = 0, *, bos_id: int | None = None,
                 corpus: str | Path | None = None) -> torch.Tensor:
    """``[n_windows, length]`` int64: disjoint windows of a corpus (default the Paul Graham essays; a .txt
    file or a folder of them), the shared definition of :func:`cab_eval.evaluate.text.haystack_windows`
    (seeded choice, kept in corpus order). ``bos_id`` leads every window (then ``length - 1`` corpus
    tokens follow): see :func:`cab_eval.evaluate.text.model_bos`."""
    from .ruler import corpus_texts
    from .text import haystack_windows

    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    head = [] if bos_id is None else [int(bos_id)]
    wins = haystack_windows(tokenizer, length - len(head), n_windows, seed=seed,
                            texts=corpus_texts(corpus) if corpus is not None else None)
    return torch.tensor([head + w for w in wins], dtype=torch.long)


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_model(device: str = "cpu", model: str | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer)``: SmolLM2 through :func:`cab_attention.hf.load_smollm2` by default, or a local
    model folder / GGUF file. float32 on CPU, bfloat16 on CUDA unless ``dtype`` says otherwise."""
    from cab_attention import hf

    dtype = dtype or default_dtype(device)
    if model is None:
        m, tok = hf.load_smollm2(device=device, dtype=dtype)
    else:
        m, tok = hf.load_model(model, device=device, dtype=dtype)
    m.eval()
    return m, tok
