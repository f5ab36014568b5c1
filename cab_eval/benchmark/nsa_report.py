"""The benchmarks page's NSA section: forward and forward+backward figures from a CSV of ``cab bench nsa``.

Every figure is the CSV's: rows that were skipped or failed appear with their ``status`` and ``-`` for
the numbers, never an estimate. The shape sentence is built from the CSV's own columns; a column that
varies between rows is spelled per length (``10 at 8k; 5 at 32k``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from .formatting import finite, fmt_ms, nlabel
from .nsa import method_name

#: The columns the section reads (a subset of :data:`cab_eval.benchmark.nsa.FIELDS`).
REQUIRED = ("date", "device", "torch", "dtype", "N", "heads", "kv_heads", "head_dim", "block_size",
            "num_selected", "window", "nsa_backend", "warmup", "reps", "method", "fwd_ms", "fwd_bwd_ms",
            "peak_gib", "status")
#: What the ``nsa_backend`` values are, for the page's sentence.
BACKEND_WORDS = {"flex": "FlexAttention", "reference": "the exact dense-mask path"}
#: The dense baseline the forward+backward ratio divides by.
DENSE_REF = method_name("dense", "CUDNN_ATTENTION")


def read_nsa_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a ``cab bench nsa`` CSV at ``path`` as strings; ``ValueError`` naming the file when it
    lacks any of :data:`REQUIRED` (listing the missing columns) or has no rows."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"--nsa-csv {path}: not a CSV of `cab bench nsa`; missing columns: {', '.join(missing)} "
                             f"(expected at least {','.join(REQUIRED)})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"--nsa-csv {path}: has a header but no rows")
    return rows


def _spelled(rows: list[dict[str, str]], col: str) -> str:
    """The column's value when all rows agree, else each value with the lengths it holds at."""
    by_value: dict[str, list[int]] = {}
    for r in rows:
        ns = by_value.setdefault(r[col], [])
        if int(r["N"]) not in ns:
            ns.append(int(r["N"]))
    if len(by_value) == 1:
        return next(iter(by_value))
    return "; ".join(f"{v} at {', '.join(nlabel(n) for n in sorted(ns))}" for v, ns in by_value.items())


def nsa_section(rows: list[dict[str, str]], csv_path: Path, rel: Callable[[Path], str]) -> str:
    """The section as markdown: one sentence on what was measured, a table per length (method, forward
    ms, forward+backward ms, forward+backward over :data:`DENSE_REF` at the same length where both were
    measured, peak GiB, status) and a pointer to ``docs/nsa.md``. ``rel`` turns a path into a link
    relative to the page."""
    if not rows:
        return ""
    backend = _spelled(rows, "nsa_backend")
    backend_words = f" ({BACKEND_WORDS[backend]})" if backend in BACKEND_WORDS else ""
    md = ["## NSA training attention (forward + backward)\n"]
    sentence = (
        f"From `{rel(csv_path)}` ({len(rows)} rows), written by `cab bench nsa`. Device: "
        f"**{_spelled(rows, 'device')}**; torch {_spelled(rows, 'torch')}; date {_spelled(rows, 'date')}. "
        f"B=1, {_spelled(rows, 'heads')} query heads over {_spelled(rows, 'kv_heads')} KV heads, head_dim "
        f"{_spelled(rows, 'head_dim')}, {_spelled(rows, 'dtype')}, causal. `nsa` is "
        "`cab_attention.nsa.NSAAttention` with NSA's own block choice and `nsa-<selector>` with a library "
        f"selector, at NSA block {_spelled(rows, 'block_size')}, {_spelled(rows, 'num_selected')} selected "
        f"blocks, window {_spelled(rows, 'window')}, backend `{backend}`{backend_words}; "
        "`dense-<backend>` is causal SDPA under that backend. Forward (autograd on) and "
        "forward plus backward are medians of CUDA-event timings (repetitions: "
        f"{_spelled(rows, 'reps')}; warm-up calls: {_spelled(rows, 'warmup')}); peak GiB is "
        "`torch.cuda.max_memory_allocated()` over the case, inputs included. The ratio is a method's "
        f"forward+backward time over `{DENSE_REF}`'s at the same N (above 1: slower than dense).\n"
    )
    if any("@flex" in r["method"] for r in rows):
        sentence += ("`<method>@flex<size>` is the same module with FlexAttention blocks of that size (the selection "
                     "stays at the NSA block; a coarser block's mask_mod reads which of its blocks are kept): "
                     "the same attention over more masked tiles; from 128 tokens on, its backward compiles with "
                     "Inductor's default tiles instead of the max-autotune tile search.\n")
    md.append(sentence)
    if any("host timer" in r["device"] for r in rows):
        md.append("> **These rows are a CPU dry run with host timers: they test the harness and say nothing "
                  "about speed.**\n")
    for n in sorted({int(r["N"]) for r in rows}):
        at_n = [r for r in rows if int(r["N"]) == n]
        ref = next((finite(r["fwd_bwd_ms"]) for r in at_n if r["method"] == DENSE_REF), None)
        body = []
        for r in at_n:
            fb = finite(r["fwd_bwd_ms"])
            ratio = f"{fb / ref:.2f}x" if fb is not None and ref else "-"
            peak = finite(r["peak_gib"])
            body.append([f"`{r['method']}`", fmt_ms(finite(r["fwd_ms"])), fmt_ms(fb), ratio,
                         "-" if peak is None else f"{peak:.2f}", r["status"].replace("|", "/") or "-"])
        md.append(f"### N = {nlabel(n)} ({n} tokens)\n")
        lines = ["| method | forward ms | forward+backward ms | fwd+bwd / dense cuDNN | peak GiB | status |",
                 "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(c) + " |" for c in body]
        md.append("\n".join(lines) + "\n")
    md.append(f"NSA itself (the module, its correctness gate, the training comparison): [nsa.md]({rel(Path('docs/nsa.md'))}).\n")
    return "\n".join(md)
