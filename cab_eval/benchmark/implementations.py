"""What the benchmarks time: the predictor implementations, their stages, the attention runners.

A predictor implementation is ``torch`` (:func:`cab_attention.select_blocks`, the library's PyTorch
path) or a Triton one (:func:`cab_attention.kernels.predict` with the options of :data:`IMPL_OPTIONS`).
The stage breakdown calls each implementation's own stage functions (``coarsen_stage``,
``score_stage``, ``select_stage``: :mod:`cab_attention.select` for torch, :mod:`cab_attention.kernels`
for Triton), so the benchmark times the library's code, not a copy of it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch


def _kernels_module():
    return importlib.import_module("cab_attention.kernels")


# Predictor implementations: ``torch`` is :func:`cab_attention.select_blocks`; the others are
# :func:`cab_attention.kernels.predict` with these keyword arguments (``precision="fp32"`` equals the
# torch path to float32 rounding; ``"bf16"`` is the kernels' fast, approximate tensor-core path).
IMPL_OPTIONS: dict[str, dict[str, Any] | None] = {
    "torch": None,
    "triton": {},
    "triton-bf16": {"precision": "bf16"},
    "triton-tf32": {"precision": "tf32"},
}
AUTO_IMPLS = ("torch", "triton", "triton-bf16")


def check_impls(names: list[str]) -> list[str]:
    """``names`` if each is ``auto``, ``both`` or a key of :data:`IMPL_OPTIONS`; else ``ValueError``."""
    for n in names:
        if n not in ("auto", "both") and n not in IMPL_OPTIONS:
            raise ValueError(f"--impl takes auto or names from {tuple(IMPL_OPTIONS)}, got {n!r}")
    return names


def triton_unavailable(device: str) -> str | None:
    """Why the Triton predictor cannot run here, or ``None``."""
    if device != "cuda":
        return "the benchmarks run the Triton predictor on CUDA only"
    try:
        mod = _kernels_module()
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"cab_attention.kernels does not import: {type(e).__name__}: {e}"
    if not callable(getattr(mod, "predict", None)):
        return "cab_attention.kernels has no predict()"
    why = getattr(mod, "unavailable_reason", lambda *a: None)("cuda")
    if why:
        return why
    if not getattr(mod, "HAS_TRITON", True):
        return f"triton failed to import: {getattr(mod, 'IMPORT_ERROR', '?')}"
    return None


def predictor_impls(choice, device: str) -> tuple[list[str], dict[str, str]]:
    """Which predictor implementations run, and a note per implementation (why one did not run)."""
    names = check_impls([p.strip() for p in choice.split(",") if p.strip()] if isinstance(choice, str) else list(choice))
    if "auto" in names:
        names = list(AUTO_IMPLS)
    elif "both" in names:
        names = ["torch", "triton"]
    why = triton_unavailable(device)
    notes = {"torch": "cab_attention.select_blocks (PyTorch ops)"}
    out = []
    for n in dict.fromkeys(names):
        if n == "torch":
            out.append(n)
        elif why is None:
            out.append(n)
            notes[n] = f"cab_attention.kernels.predict(**{IMPL_OPTIONS[n]})"
        else:
            notes[n] = f"not run: {why}"
    if "torch" not in names:
        notes.pop("torch")
    return out, notes


def head_impl(impls) -> str:
    """The predictor implementation that headlines: ``triton`` (exact), else another Triton one, else torch."""
    if "triton" in impls:
        return "triton"
    return next((i for i in impls if i != "torch"), "torch")


#: Benchmark selector names that are not library selectors: ``cab-default`` is ``cab`` with the
#: library's default options (what the issue's targets name), beside ``cab`` with the named configuration
#: of :func:`bench_options` (comparable with earlier recorded rows).
BENCH_ALIASES = {"cab-default": "cab"}


def library_selector(name: str) -> str:
    """The :func:`cab_attention.select_blocks` selector behind a benchmark selector name."""
    return BENCH_ALIASES.get(name, name)


def bench_options(selector: str) -> dict[str, Any]:
    """Selector options every benchmark case uses: for ``cab`` the named configuration
    :data:`cab_attention.options.FORMAN_KEEP_LOWEST_MAXL2` (augmented Forman, keep
    lowest, max-L2), spelled out so that the recorded figures stay comparable when library defaults
    move. The default triangle proxy needs the same ``A @ A`` and costs the same within noise.
    ``cab-default``: no options (the library's defaults)."""
    from cab_attention.options import FORMAN_KEEP_LOWEST_MAXL2

    return dict(FORMAN_KEEP_LOWEST_MAXL2) if selector == "cab" else {}


def predict_fn(impl: str, selector: str, q, k, *, sparsity: float, block_size: int) -> Callable[[], Any] | None:
    """A zero-argument callable returning a ``BlockSelection``, or ``None`` when this implementation
    does not cover ``selector``."""
    from cab_attention import select_blocks

    opts = bench_options(selector)
    selector = library_selector(selector)
    if impl == "torch":
        return lambda: select_blocks(q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=True, **opts)
    mod = _kernels_module()
    if selector == "antidiagonal":
        # The fused estimator (kernels/antidiagonal.py). Half inputs multiply natively on tensor cores
        # whatever the precision option, so only the exact ``triton`` implementation runs it.
        if impl != "triton" or not callable(getattr(mod, "predict_antidiagonal", None)):
            return None
        return lambda: mod.predict_antidiagonal(q, k, sparsity=sparsity, block_size=block_size, causal=True)
    if selector not in getattr(mod, "SUPPORTED_SELECTORS", ("cab",)):
        return None
    kw = dict(IMPL_OPTIONS[impl] or {})
    return lambda: mod.predict(q, k, selector=selector, sparsity=sparsity, block_size=block_size, causal=True,
                               **opts, **kw)


def graphed_fn(impl: str, selector: str, q, k, *, sparsity: float, block_size: int) -> Callable[[], Any] | None:
    """The same predictor through :func:`cab_attention.kernels.predict_graphed` (one CUDA graph per
    shape and options); ``None`` where it does not apply (torch, or a selector it does not capture)."""
    if impl == "torch" or not callable(getattr(_kernels_module(), "predict_graphed", None)):
        return None
    if library_selector(selector) == "antidiagonal" and impl != "triton":
        return None
    if library_selector(selector) not in ("cab", "magnitude", "antidiagonal"):
        return None
    mod = _kernels_module()
    opts = bench_options(selector)
    if library_selector(selector) != "antidiagonal":
        opts.update(IMPL_OPTIONS[impl] or {})
    return lambda: mod.predict_graphed(q, k, selector=library_selector(selector), sparsity=sparsity,
                                       block_size=block_size, causal=True, **opts)


def attention_unavailable(backend: str, device: str) -> str | None:
    """Why an attention backend of the benchmarks cannot run here, or ``None``: ``triton`` needs CUDA (or
    the CPU interpreter, ``TRITON_INTERPRET=1``), ``flex`` CUDA (the CPU dry run uses ``reference``)."""
    if backend == "triton":
        try:
            from cab_attention.kernels import attention as A
        except Exception as e:  # noqa: BLE001 - no triton
            return f"the Triton attention kernel does not import: {type(e).__name__}: {e}"
        interp = A._interpreting()
        if device == "cuda" and interp:
            return "TRITON_INTERPRET=1 is set"
        if device == "cpu" and not interp:
            return "on CPU the kernel runs only under TRITON_INTERPRET=1"
        return None
    if backend == "flex" and device != "cuda":
        return "the CPU dry run times the reference backend"
    return None


def triton_runner(q, k, v, selection) -> Callable[[], torch.Tensor]:
    """The block-sparse Triton kernel alone over a selection (``backend="triton"``, default tiles)."""
    from cab_attention.kernels.attention import triton_attention_blocks

    return lambda: triton_attention_blocks(q, k, v, selection)


def build_mask_fn(impl: str) -> Callable[[Any], Any]:
    """The implementation's BlockMask builder: the kernels' own (``kernels.block_mask``) for Triton
    implementations, :meth:`BlockSelection.to_block_mask` for torch."""
    if impl != "torch":
        fn = getattr(_kernels_module(), "block_mask", None)
        if callable(fn):
            return fn
    return lambda sel: sel.to_block_mask()


def stage_fns(impl: str, q, k, *, sparsity: float, block_size: int, selector: str = "cab") -> dict[str, Callable]:
    """The predictor's stages as chained callables ``coarsen() -> score(c) -> select(s) -> mask(sel)``.

    Each implementation's own stage functions with the options of :func:`bench_options`: for torch
    :func:`cab_attention.select.coarsen_stage`, ``score_stage`` and ``select_stage`` (what
    :func:`cab_attention.select_blocks` runs) and :meth:`BlockSelection.to_block_mask`; for Triton
    the same-named functions of :mod:`cab_attention.kernels` and ``kernels.block_mask``. The row budget
    is the exact fixed-sparsity budget of :meth:`BlockGrid.budget`, computed once outside the timing.
    """
    from cab_attention.geometry import BlockGrid
    from cab_attention.selection import BlockSelection

    grid = BlockGrid.of(q, k, block_size, True)
    budget = grid.budget(sparsity, q.device)
    if impl == "torch":
        mod, kw = importlib.import_module("cab_attention.select"), {}
    else:
        mod, kw = _kernels_module(), dict(IMPL_OPTIONS[impl] or {})
        budget = budget.to(torch.int32)
    opts = bench_options(selector)
    coarsen = opts.pop("coarsen", "max_l2")

    def select(scores):
        mask, num, idx = mod.select_stage(scores, grid, budget)
        return BlockSelection(mask, num, idx, grid, selector)

    return {
        "coarsen": lambda: mod.coarsen_stage(q, k, grid, coarsen),
        "score": lambda c: mod.score_stage(c[0], c[1], grid, selector=selector, **opts, **kw),
        "select": select,
        "mask": build_mask_fn(impl),
    }


def total_fn(impl: str, selector: str, q, k, v, *, sparsity: float, block_size: int, backend: str = "flex"):
    """Predictor + BlockMask + attention in one call. torch: the public
    :func:`cab_attention.sparse_attention`, exactly what a user runs. Triton: ``kernels.predict``, then
    ``kernels.block_mask`` and the library's compiled FlexAttention (what the kernels make possible;
    :func:`cab_attention.sparse_attention` with a given selection would rebuild the mask the torch way);
    with ``backend="triton"`` the predictor's selection goes straight to the Triton attention kernel.
    ``None`` when the implementation does not cover the selector."""
    from cab_attention import sparse_attention

    if impl == "torch":
        opts = bench_options(selector)
        return lambda: sparse_attention(q, k, v, selector=library_selector(selector), sparsity=sparsity,
                                        block_size=block_size, causal=True, backend=backend, **opts)
    pf = predict_fn(impl, selector, q, k, sparsity=sparsity, block_size=block_size)
    if pf is None:
        return None
    if backend == "triton":
        # The kernel reads kv_num_blocks / kv_indices directly: no BlockMask to build.
        from cab_attention.kernels.attention import triton_attention_blocks

        return lambda: triton_attention_blocks(q, k, v, pf())
    build = build_mask_fn(impl)
    from cab_attention import execute as E

    n = q.shape[2]
    if n % block_size or n != k.shape[2]:
        return lambda: sparse_attention(q, k, v, selection=pf(), block_size=block_size, causal=True, backend=backend)
    opts = E.flex_kernel_options(block_size, q.device.type)
    gqa = q.shape[1] != k.shape[1]
    flex = E.compiled_flex_attention()
    return lambda: flex(q, k, v, block_mask=build(pf()), enable_gqa=gqa, kernel_options=opts)


def flex_runner(q, k, v, selection, build: Callable[[Any], Any] | None = None) -> Callable[[], torch.Tensor]:
    """The FlexAttention kernel alone over a prebuilt ``BlockMask`` (the library's compiled flex and its
    kernel tile options); ``build`` makes the mask (default :meth:`BlockSelection.to_block_mask`; the
    attention benchmark passes the headline implementation's builder so that the kernel-alone and the
    end-to-end cases share one compiled FlexAttention per shape). Falls back to
    :func:`cab_attention.execute.flex_attention_blocks` (mask build included) when the lengths need
    padding."""
    from cab_attention import execute as E

    g = selection.grid
    bs = g.block_size
    if g.q_len % bs or g.kv_len % bs or g.q_len != g.kv_len:
        return lambda: E.flex_attention_blocks(q, k, v, selection)
    bm = (build or (lambda sel: sel.to_block_mask()))(selection)
    opts = E.flex_kernel_options(bs, q.device.type)
    gqa = q.shape[1] != k.shape[1]
    fn = E.compiled_flex_attention()
    return lambda: fn(q, k, v, block_mask=bm, enable_gqa=gqa, kernel_options=opts)


def merge_selection(selection, factor: int = 2):
    """A selection at ``factor`` times the block size: a coarse tile is kept when any of its sub-blocks
    is (a superset of the original: more tiles computed, nothing dropped)."""
    from cab_attention.geometry import BlockGrid
    from cab_attention.select import kv_layout
    from cab_attention.selection import BlockSelection

    g = selection.grid
    g2 = BlockGrid(g.batch, g.q_heads, g.kv_heads, g.q_len, g.kv_len, g.head_dim, g.block_size * factor, g.causal)
    m = selection.query_head_mask()
    b, h, mq, mk = m.shape
    mq2, mk2 = g2.num_q_blocks, g2.num_kv_blocks
    if g.q_pad_front or g2.q_pad_front:
        raise ValueError("merge_selection handles aligned queries only (Nq == Nk)")
    mp = torch.nn.functional.pad(m, (0, mk2 * factor - mk, 0, mq2 * factor - mq))
    m2 = mp.view(b, h, mq2, factor, mk2, factor).any(5).any(3) & g2.valid(m.device)
    num, idx = kv_layout(m2)
    return BlockSelection(m2, num, idx, g2, selection.selector + "+merged")
