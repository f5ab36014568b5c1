"""The time-to-first-token section of the benchmarks page, from a CSV of ``cab bench model`` (a
Llama-3-8B-shaped model prefilling N tokens, dense and sparse); the figures are the CSV's, unchanged."""

from __future__ import annotations

from pathlib import Path

from .formatting import finite, fmt, fmt_ms, nlabel, table


def model_section(model_rows, model_csv: Path, rel) -> str:
    """The ``cab bench model`` rows as markdown: per length and variant, forward ms, attention ms (forward
    minus the no-attention forward), attention share, speedups over ``dense:sdpa-cudnn``, block density,
    peak GiB. Only ``ok`` rows; the figures are the CSV's, unchanged."""
    ok = [r for r in model_rows if r.get("status", "ok").startswith("ok")]
    if not ok:
        return ""
    first = ok[0]
    md = ["## Time to first token in a Llama-3-8B-shaped model (`cab bench model`)\n",
          f"From `{rel(model_csv)}` ({len(model_rows)} rows). Device: **{first.get('device', '?')}**; torch "
          f"{first.get('torch', '?')}; date {first.get('date', '?')}. A transformers `LlamaForCausalLM` with "
          f"Llama-3-8B's shapes, {first.get('layers', '?')} layers, random weights, bf16, prefilling N tokens "
          "with `logits_to_keep=1`. `none` replaces attention by zeros; attention ms = forward - none. "
          "`sparse:<selector>[<attention backend>]/<predictor impl>` runs `cab_attention.hf.enable` at the "
          "sparsity shown; speedups are over `dense:sdpa-cudnn` at the same N.\n"]
    body = []
    for n in sorted({int(r["n"]) for r in ok}, reverse=True):
        for r in (r for r in ok if int(r["n"]) == n):
            none = r["variant"] == "none"
            s = finite(r.get("sparsity"))
            body.append([nlabel(n), f"`{r['variant']}`", "-" if none or r["variant"].startswith("dense") or s is None else f"{s:.0%}",
                         fmt(finite(r.get("density")), ".4f"), fmt_ms(finite(r.get("ms"))), fmt_ms(finite(r.get("attention_ms"))),
                         fmt(finite(r.get("attention_share")), ".1%"), fmt(finite(r.get("speedup_forward")), ".2f"),
                         fmt(finite(r.get("speedup_attention")), ".2f"), fmt(finite(r.get("peak_gib")), ".2f")])
    md.append(table(["N", "variant", "sparsity", "density", "forward ms", "attention ms", "attention share",
                     "speedup (forward)", "speedup (attention)", "peak GiB"], body))
    bad = [r for r in model_rows if not r.get("status", "ok").startswith("ok")]
    if bad:
        md.append("Not measured: " + "; ".join(f"{r['n']} `{r['variant']}` ({r['status']})" for r in bad) + "\n")
    return "\n".join(md)
