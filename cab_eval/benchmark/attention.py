"""``cab bench attention``: dense baselines against CAB's block-sparse attention, end to end.

Per ``(N, B)``, in one process and on the same inputs:

* ``attention:sdpa-flash`` and ``attention:sdpa-cudnn``: ``F.scaled_dot_product_attention`` (causal,
  GQA) under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` / ``CUDNN_ATTENTION``; where a backend refuses
  ``enable_gqa`` the keys and values are repeated beforehand (status says so);
* ``attention:flex-dense``: FlexAttention over the dense causal ``BlockMask`` at 128-token blocks (its
  usual tile);
* per sparsity: ``attention:cab-sparse`` the FlexAttention kernel alone over CAB's mask (block 64,
  kernel tile ``BLOCK_M = BLOCK_N = 64``), ``@bs128`` selecting at 128 tokens (tile 128 x 64), and
  ``@merge128`` the 64-token selection merged into 128-token tiles (a tile runs when any of its four
  64-blocks was chosen: more tiles, faster ones); TFLOP/s count the computed tiles exactly;
* with the Triton attention backend (``--attention-backends``, default ``flex,triton``; CUDA):
  ``attention:cab-sparse[triton]`` (and ``@bs128``) the kernel alone over the same masks, and
  ``total:<selector>[impl]+triton`` predictor plus kernel (no BlockMask) for ``cab`` and ``antidiagonal``
  (its fused Triton estimator) at every block size and sparsity, at the headline sparsity also
  ``cab[triton-bf16]`` and ``cab-default`` (the library's default options); the ``kept_tflops`` column is
  the kept-tile rate (every kept tile whole), beside ``tflops`` (causal diagonal tiles at half);
* ``total:<selector>[impl]``: predictor + BlockMask + attention in one call. ``[torch]`` is
  :func:`cab_attention.sparse_attention` as a user calls it; Triton implementations run
  ``kernels.predict``, ``kernels.block_mask`` and the library's compiled FlexAttention. CAB with the
  headline implementation at every sparsity; at the headline sparsity (0.95) also CAB with every
  implementation and ``@bs128``, ``total:magnitude`` (torch and headline implementation) and
  ``total:antidiagonal[torch]``.

Batch-sweep groups (``--batches`` at ``--batch-n``) run the dense baselines, the 64-block kernel and the
CAB and magnitude totals at ``--batch-sparsities``. Groups run B = 1 up to 128k first, then the batch
sweep, then longer N; ``--budget-s`` skips (and logs) the cases that would no longer fit.

On CPU (``--dry-run``) the dense baseline is plain SDPA (``attention:sdpa-cpu``) and sparse attention
uses the ``reference`` backend (``[reference]`` in the case name): host timers, for testing only.

Usage: ``cab bench attention [--n 1k,...,128k] [--block-sizes 64,128] [--budget-s 300] [--dry-run]``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .cli import headline, run_cli
from .implementations import (
    bench_options,
    build_mask_fn,
    flex_runner,
    head_impl,
    merge_selection,
    total_fn,
    triton_runner,
)
from .inputs import dense_causal_flops, kept_flops, make_inputs, tile_flops
from .io import CaseRecorder
from .timing import free_memory


def _sdpa_fn(q, k, v, backend_name: str):
    """SDPA under one backend, GQA native where the backend takes it, else K/V repeated up front."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    gqa = q.shape[1] != k.shape[1]

    def native():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    try:
        native()
        torch.cuda.synchronize()
        return native, "ok"
    except RuntimeError as e:
        if not gqa:
            raise
        first = str(e).splitlines()[0][:80]
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

    def repeated():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    return repeated, f"ok: K/V repeated for GQA (enable_gqa refused: {first})"


def dense_cases(cfg, rec: CaseRecorder, q, k, v, n: int, batch: int) -> None:
    flops = dense_causal_flops(batch, cfg.heads, n, cfg.head_dim)
    if not cfg.cuda:
        from cab_attention import dense_attention

        rec.measure("attention:sdpa-cpu", n, batch, lambda: (lambda: dense_attention(q, k, v)), flops=flops)
        return
    for case, backend in (("attention:sdpa-cudnn", "CUDNN_ATTENTION"), ("attention:sdpa-flash", "FLASH_ATTENTION")):
        note = {}

        def make(backend=backend, note=note):
            fn, status = _sdpa_fn(q, k, v, backend)
            note["status"] = status
            return fn

        ms = rec.measure(case, n, batch, make, flops=flops)
        if ms is not None and note.get("status", "ok") != "ok":
            rec.rows[-1]["status"] = note["status"]
    from cab_attention import select_blocks

    dense_bs = 128

    def make_flex_dense():
        sel = select_blocks(q, k, selector="dense", block_size=dense_bs, causal=True)
        return flex_runner(q, k, v, sel, build_mask_fn(head_impl(cfg.impls)))

    rec.measure("attention:flex-dense", n, batch, make_flex_dense, block_size=dense_bs, density=1.0, flops=flops)


def sparse_cases(cfg, rec: CaseRecorder, q, k, v, n: int, batch: int, sparsities: list[float]) -> None:
    """Per sparsity: the attention kernel over CAB's mask (each block-size variant) and CAB end to end
    with the headline predictor; at the headline sparsity also CAB with every predictor implementation
    and at 128-token selection, and the magnitude and antidiagonal baselines end to end (the
    antidiagonal predictor, fp32 and O(N^2 D / 8), dominates its cost and does not depend on s)."""
    from cab_attention import reference_attention, select_blocks

    main_bs = cfg.block_sizes[0]
    hs = headline(sparsities)
    att_tag = "" if cfg.cuda else "[reference]"
    backend = "flex" if cfg.cuda else "reference"
    build = build_mask_fn(head_impl(cfg.impls))
    for s in sparsities:
        # The attention kernel alone over CAB's selection (the torch predictor's mask; the Triton
        # predictor reproduces it, and the kernel's cost depends on the tiles it runs).
        for bs in cfg.block_sizes:
            suffix = "" if bs == main_bs else f"@bs{bs}"
            try:
                sel = select_blocks(q, k, selector="cab", sparsity=s, block_size=bs, causal=True, **bench_options("cab"))
            except Exception as e:  # noqa: BLE001
                rec.skip(f"attention:cab-sparse{att_tag}{suffix}", n, batch, f"selection failed: {type(e).__name__}: {e}",
                         sparsity=s, block_size=bs)
                free_memory(cfg.cuda)
                continue
            if cfg.cuda:
                make = lambda sel=sel: flex_runner(q, k, v, sel, build)  # noqa: E731
            else:
                make = lambda sel=sel: (lambda: reference_attention(q, k, v, sel))  # noqa: E731
            if "flex" in cfg.attention_backends:
                rec.measure(f"attention:cab-sparse{att_tag}{suffix}", n, batch, make, sparsity=s, block_size=bs,
                            density=sel.density, flops=lambda sel=sel: tile_flops(sel),
                            kept_flops=lambda sel=sel: kept_flops(sel), backend=backend)
            if "triton" in cfg.attention_backends:
                rec.measure(f"attention:cab-sparse[triton]{suffix}", n, batch,
                            lambda sel=sel: triton_runner(q, k, v, sel), sparsity=s, block_size=bs,
                            density=sel.density, flops=lambda sel=sel: tile_flops(sel),
                            kept_flops=lambda sel=sel: kept_flops(sel), backend="triton")
            if bs == main_bs and 2 * main_bs in cfg.block_sizes and cfg.cuda and "flex" in cfg.attention_backends:
                try:
                    merged = merge_selection(sel, 2)
                    rec.measure(f"attention:cab-sparse@merge{2 * main_bs}", n, batch,
                                lambda merged=merged: flex_runner(q, k, v, merged, build), sparsity=s,
                                block_size=2 * main_bs, density=merged.density,
                                flops=lambda merged=merged: tile_flops(merged))
                    del merged
                except Exception as e:  # noqa: BLE001
                    rec.skip(f"attention:cab-sparse@merge{2 * main_bs}", n, batch, f"{type(e).__name__}: {e}", sparsity=s)
            del sel
            free_memory(cfg.cuda)
        # End to end: predictor + BlockMask + attention. At every sparsity the headline predictor
        # implementation; at the headline sparsity also every implementation, 128-token selection,
        # and the baselines (magnitude with torch and the headline implementation, antidiagonal).
        hi = head_impl(cfg.impls)
        todo = [("cab", hi, main_bs)]
        if s == hs:
            todo += [("cab", i, main_bs) for i in cfg.impls if i != hi]
            todo += [("cab", hi, bs) for bs in cfg.block_sizes[1:]]
            if "magnitude" in cfg.selectors:
                todo += [("magnitude", i, main_bs) for i in dict.fromkeys(["torch", hi])]
            if "antidiagonal" in cfg.selectors:
                if n > cfg.max_antidiagonal_n:
                    rec.skip("total:antidiagonal[torch]", n, batch, "N > --max-antidiagonal-n", sparsity=s,
                             block_size=main_bs)
                else:
                    todo.append(("antidiagonal", "torch", main_bs))
        if "cab" not in cfg.selectors:
            todo = [t for t in todo if t[0] != "cab"]
        if "flex" not in cfg.attention_backends:
            todo = []
        for sel_name, impl, bs in todo:
            suffix = "" if bs == main_bs else f"@bs{bs}"
            rec.measure(f"total:{sel_name}[{impl}]{suffix}", n, batch,
                        lambda sel_name=sel_name, impl=impl, bs=bs: total_fn(
                            impl, sel_name, q, k, v, sparsity=s, block_size=bs, backend=backend),
                        sparsity=s, block_size=bs, backend=backend)
        if "triton" in cfg.attention_backends:
            for sel_name, impl, bs in triton_totals(cfg, s == hs, n):
                suffix = "" if bs == main_bs else f"@bs{bs}"
                rec.measure(f"total:{sel_name}[{impl}]+triton{suffix}", n, batch,
                            lambda sel_name=sel_name, impl=impl, bs=bs: total_fn(
                                impl, sel_name, q, k, v, sparsity=s, block_size=bs, backend="triton"),
                            sparsity=s, block_size=bs, backend="triton")
        free_memory(cfg.cuda)


def triton_totals(cfg, headline_s: bool, n: int) -> list[tuple[str, str, int]]:
    """``(selector, predictor implementation, block size)`` of the end-to-end cases with the Triton attention
    kernel: at every sparsity ``cab`` (headline predictor) and ``antidiagonal`` (its fused Triton estimator
    where the kernels run, else torch) at every block size; at the headline sparsity also ``cab`` with the
    other Triton predictors (``triton-bf16``) and ``cab-default`` (the library's default options)."""
    hi = head_impl(cfg.impls)
    anti = "triton" if "triton" in cfg.impls else "torch"
    out = []
    for bs in cfg.block_sizes:
        if "cab" in cfg.selectors:
            out.append(("cab", hi, bs))
            if headline_s:
                out += [("cab", i, bs) for i in cfg.impls if i not in (hi, "torch")]
                out.append(("cab-default", hi, bs))
        if "antidiagonal" in cfg.selectors and (anti != "torch" or n <= cfg.max_antidiagonal_n):
            out.append(("antidiagonal", anti, bs))
    return out


def run_group(cfg, rec: CaseRecorder, n: int, batch: int, sparsities: list[float]) -> None:
    q, k, v = make_inputs(cfg, n, batch)
    dense_cases(cfg, rec, q, k, v, n, batch)
    free_memory(cfg.cuda)
    sparse_cases(cfg, rec, q, k, v, n, batch, sparsities)
    del q, k, v
    free_memory(cfg.cuda)


def main(argv: list[str] | None = None) -> int:
    return run_cli("attention", __doc__.split("\n\n")[0], lambda view, rec, n, batch, sparsities, light: run_group(view, rec, n, batch, sparsities), argv)


if __name__ == "__main__":
    sys.exit(main())
