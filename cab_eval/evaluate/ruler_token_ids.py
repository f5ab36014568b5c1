"""The token-id file of RULER-style prompts: :func:`save_prompts` writes the prompts that
``cab eval ruler build`` tokenised (with their metadata) as JSON, gzipped when the name ends in ``.gz``,
and :func:`load_prompts` reads them back for ``cab eval ruler run`` on another machine. Both ends record
:func:`check_sentence_record`, the tokens of a known sentence, so that a tokenizer that differs between
the two machines shows up.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from .ruler_haystack import encode
from .ruler_tasks import RulerPrompt

CHECK_SENTENCE = ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
                  "seemed to unite some of the best blessings of existence.")
"""A known sentence whose token count every build and run records: a tokenizer that differs between
the machine that builds prompts and the one that runs them shows up here (RESEARCH.md section 8)."""


def save_prompts(path: str | Path, prompts: Sequence[RulerPrompt], meta: dict[str, Any]) -> Path:
    """Write ``{"meta": ..., "prompts": [...]}`` as JSON (gzip when the name ends in ``.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"meta": meta, "prompts": [asdict(p) for p in prompts]}, separators=(",", ":"))
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data)
    return path


def load_prompts(path: str | Path) -> tuple[list[RulerPrompt], dict[str, Any]]:
    """Read a file written by :func:`save_prompts`; ``ValueError`` when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"token-ids must be an existing file written by 'cab eval ruler build', got {str(path)!r}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "prompts" not in data or "meta" not in data:
        raise ValueError(f"token-ids file {path} holds no 'meta' and 'prompts'")
    prompts = []
    for d in data["prompts"]:
        d["spans"] = [tuple(s) for s in d.get("spans", [])]
        prompts.append(RulerPrompt(**d))
    return prompts, data["meta"]


def check_sentence_record(tokenizer: Any) -> dict[str, Any]:
    """Token ids and count of :data:`CHECK_SENTENCE` under ``tokenizer``."""
    ids = encode(tokenizer, CHECK_SENTENCE)
    return {"sentence": CHECK_SENTENCE, "ids": ids, "tokens": len(ids)}

