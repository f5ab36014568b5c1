"""``cab bench predictor``: the cost of choosing the blocks.

Per ``(N, B)`` and predictor implementation (``[torch]`` always; ``[triton]``, the kernels' exact
float32 path, and ``[triton-bf16]``, their fast approximate path, where :mod:`cab_attention.kernels`
runs on this machine):

* ``predictor:cab[impl]:coarsen|score|select|mask``: each stage timed alone on the previous stage's
  output, at the headline sparsity (0.95; coarsen and score do not depend on it: sparsity empty);
* ``predictor:cab[impl]`` the whole predictor, coarsen to FlexAttention ``BlockMask``, at every
  sparsity, with its peak memory beyond the inputs; ``@bs128`` the same selecting at 128 tokens;
* ``predictor:magnitude[impl]`` and ``predictor:antidiagonal[torch]``: the baselines on the same
  pipeline at the headline sparsity (the antidiagonal scorer runs in float32 at O(N^2 D / stride); it
  stops at ``--max-antidiagonal-n``).

* ``predictor:antidiagonal[triton]``: the fused Triton estimator (:mod:`cab_attention.kernels.antidiagonal`);
* ``predictor:<selector>[<impl>-graph]`` (CUDA, N <= ``--graph-max-n``): the Triton predictor through a
  CUDA graph (:func:`cab_attention.kernels.predict_graphed`), its selection checked equal to the eager one
  (status ``mismatch`` otherwise).

Batch-sweep groups measure ``predictor:cab`` and ``predictor:magnitude`` only.

Usage: ``cab bench predictor [--n 1k,...,128k] [--budget-s 120] [--dry-run]`` (see ``--help``).
"""

from __future__ import annotations

import sys

from .cli import headline, run_cli
from .implementations import build_mask_fn, graphed_fn, predict_fn, stage_fns
from .inputs import make_inputs
from .io import CaseRecorder
from .timing import free_memory


def run_group(cfg, rec: CaseRecorder, n: int, batch: int, sparsities: list[float], light: bool = False) -> None:
    """Per implementation: the stage breakdown at the headline sparsity (not in light groups), the whole
    cab predictor at every sparsity (and at the other block sizes at the headline sparsity), and the
    baselines at the headline sparsity (their cost does not depend on it)."""
    q, k, _ = make_inputs(cfg, n, batch)
    main_bs = cfg.block_sizes[0]
    hs = headline(sparsities)
    for impl in cfg.impls:
        tag = f"[{impl}]"
        if "cab" in cfg.selectors and not light:
            stage_breakdown(cfg, rec, impl, q, k, n, batch, [hs], main_bs)
        build = build_mask_fn(impl)
        for sel_name in cfg.selectors:
            if sel_name == "antidiagonal" and n > cfg.max_antidiagonal_n and impl == "torch":
                # the O(N^2 D / stride) torch estimator stops here; the fused kernel runs at every N
                rec.skip(f"predictor:{sel_name}{tag}", n, batch, "N > --max-antidiagonal-n", sparsity=hs,
                         block_size=main_bs)
                continue
            plan_s = [(bs, s) for s in (sparsities if sel_name == "cab" else [hs]) for bs in [main_bs]]
            if sel_name in ("cab", "cab-default", "antidiagonal"):
                plan_s += [(bs, hs) for bs in cfg.block_sizes[1:]]
            for bs, s in plan_s:
                suffix = "" if bs == main_bs else f"@bs{bs}"
                pf = predict_fn(impl, sel_name, q, k, sparsity=s, block_size=bs)
                if pf is None:
                    break  # this implementation does not cover the selector
                rec.measure(f"predictor:{sel_name}{tag}{suffix}", n, batch,
                            lambda pf=pf: (lambda: build(pf())), sparsity=s, block_size=bs)
            free_memory(cfg.cuda)
    if cfg.cuda and n <= cfg.graph_max_n and not light:
        graphed_cases(cfg, rec, q, k, n, batch, hs)
    del q, k
    free_memory(cfg.cuda)


def same_selection(a, b) -> str | None:
    """``None`` when two selections keep the same blocks in the same layout, else what differs."""
    if a.kv_num_blocks.shape != b.kv_num_blocks.shape:
        return f"shapes {tuple(a.kv_num_blocks.shape)} vs {tuple(b.kv_num_blocks.shape)}"
    rows = (a.kv_num_blocks != b.kv_num_blocks) | (a.kv_indices != b.kv_indices).any(-1)
    bad = int(rows.sum())
    return None if bad == 0 else f"{bad} of {rows.numel()} rows differ from the eager predictor"


def graphed_cases(cfg, rec: CaseRecorder, q, k, n: int, batch: int, s: float) -> None:
    """``predictor:<selector>[<impl>-graph]``: the Triton predictor through one CUDA graph per shape
    (:func:`cab_attention.kernels.predict_graphed`) plus the BlockMask, at the headline sparsity and every
    block size, for ``cab`` (each Triton implementation) and ``antidiagonal``. The graphed selection is
    compared with the eager one on the same inputs; a difference makes the row's status ``mismatch``."""
    for impl in [i for i in cfg.impls if i != "torch"]:
        build = build_mask_fn(impl)
        for sel_name in [x for x in cfg.selectors if x in ("cab", "antidiagonal")]:
            for bs in cfg.block_sizes:
                gf = graphed_fn(impl, sel_name, q, k, sparsity=s, block_size=bs)
                pf = predict_fn(impl, sel_name, q, k, sparsity=s, block_size=bs)
                if gf is None or pf is None:
                    continue
                suffix = "" if bs == cfg.block_sizes[0] else f"@bs{bs}"
                rec.measure(f"predictor:{sel_name}[{impl}-graph]{suffix}", n, batch,
                            lambda gf=gf: (lambda: build(gf())), sparsity=s, block_size=bs,
                            check=lambda _out, gf=gf, pf=pf: same_selection(gf(), pf()))
            free_memory(cfg.cuda)


def stage_breakdown(cfg, rec: CaseRecorder, impl: str, q, k, n: int, batch: int, sparsities, bs: int) -> None:
    """coarsen and score once (they do not depend on the sparsity), select and mask per sparsity; each
    stage timed alone on the previous stage's output."""
    tag = f"predictor:cab[{impl}]"
    try:
        st = stage_fns(impl, q, k, sparsity=sparsities[0], block_size=bs)
        c = st["coarsen"]()
        sc = st["score"](c)
    except Exception as e:  # noqa: BLE001
        rec.skip(f"{tag}:stages", n, batch, f"stage functions failed: {type(e).__name__}: {str(e)[:160]}", block_size=bs)
        free_memory(cfg.cuda)
        return
    rec.measure(f"{tag}:coarsen", n, batch, lambda: st["coarsen"], block_size=bs)
    rec.measure(f"{tag}:score", n, batch, lambda c=c: (lambda: st["score"](c)), block_size=bs)
    del c
    for s in sparsities:
        sts = stage_fns(impl, q, k, sparsity=s, block_size=bs)
        try:
            sel = sts["select"](sc)
        except Exception as e:  # noqa: BLE001
            rec.skip(f"{tag}:select", n, batch, f"{type(e).__name__}: {str(e)[:160]}", sparsity=s, block_size=bs)
            continue
        rec.measure(f"{tag}:select", n, batch, lambda sts=sts, sc=sc: (lambda: sts["select"](sc)),
                    sparsity=s, block_size=bs, density=sel.density)
        rec.measure(f"{tag}:mask", n, batch, lambda sts=sts, sel=sel: (lambda: sts["mask"](sel)), sparsity=s, block_size=bs)
        del sel
    del sc
    free_memory(cfg.cuda)


def main(argv: list[str] | None = None) -> int:
    return run_cli("predictor", __doc__.split("\n\n")[0], run_group, argv)


if __name__ == "__main__":
    sys.exit(main())
