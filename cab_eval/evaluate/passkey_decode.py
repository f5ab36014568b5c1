"""The short greedy decode after a passkey prefill: :func:`generate_answers` decodes every prompt of a
batch and stops a row as soon as its continuation holds a complete number (the key is in; more tokens
would not change the verdict)."""

from __future__ import annotations

import re
from typing import Any

import torch


class _NumberDone:
    """Stop a row once its continuation holds a complete number (digits followed by a non-digit):
    the answer is in, the rest of the decode would not change the verdict."""

    def __init__(self, tokenizer: Any, start: int):
        self.tok, self.start = tokenizer, start

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kw: Any) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.start :].tolist():
            text = self.tok.decode(row, skip_special_tokens=True)
            done.append(bool(re.search(r"\d+\D", text)))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_answers(model: Any, tok: Any, ids: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Greedy continuations of the prompts ``ids`` ``[B, N]`` (equal token counts), at most
    ``max_new_tokens`` each, a row stopping at its first complete number; one decoded string per row."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, input_ids, scores, **kwargs):
            return self.fn(input_ids, scores)

    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_Stop(_NumberDone(tok, ids.shape[1]))]),
        )
    return [tok.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]
