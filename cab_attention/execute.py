"""Stage 4, execute: block-sparse attention over a :class:`BlockSelection`.

Backends:

* ``reference``: exact dense-mask attention in the inputs' dtype (scores, softmax, weighted sum),
  computed in query chunks so that memory stays ``O(chunk x Nk)``; any device and dtype. It is the
  ground truth that every fast path is tested against.
* ``flex``: FlexAttention under ``torch.compile`` with a ``BlockMask`` from the coarse indices. The
  mask's ``BLOCK_SIZE`` is the selection block size, and on CUDA the kernel tile is set to divide it
  (``BLOCK_M = min(block_size, 128)``, ``BLOCK_N = min(block_size, 64)``); FlexAttention's default tile
  (128 x 64) would refuse a 64-token mask. float64 is a ``ValueError`` (FlexAttention's compiled kernels
  do not take it), as is float16 on CPU.
* ``triton``: the block-sparse Triton kernel of :mod:`cab_attention.kernels.attention` (GQA-native,
  reads ``kv_num_blocks`` / ``kv_indices`` directly); CUDA, or CPU under ``TRITON_INTERPRET=1``.
* ``auto`` (:func:`auto_backend`): ``triton`` on CUDA for float16/bfloat16/float32 where the kernel can
  run (triton importable, block >= 16, D <= 256), else ``flex`` on CUDA (not float64), else
  ``reference``. When ``auto`` would select the blocks itself (no ``selection=``, no ``window``), would run
  the Triton kernel, and the context is shorter than :data:`AUTO_DENSE_BELOW` keys (8192, measured on an
  H200), it runs dense SDPA instead: the result is then *exact dense attention* (no block is dropped),
  because below the break-even selecting costs more than it saves.

Inputs are checked before anything runs: shapes and dtypes, NaN/inf in q, k, v (``check_finite``), and a
given selection's grid and rows (every row must keep a causally valid block).

Fewer queries than one block (decode, tiny chunks) take a dense path: every causally valid key.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from .options import DEFAULT_SELECTOR
from .geometry import BlockGrid, check_block_size, check_qkv, check_sparsity
from .geometry import check_finite as check_finite_fn
from .options import resolve_options
from .select import select_blocks
from .selection import BlockSelection

BACKENDS = ("auto", "reference", "flex", "triton")

#: ``backend="auto"`` without a given selection runs dense SDPA (exact dense attention) when the key
#: length is below this many tokens and ``auto`` would run a backend of :data:`AUTO_DENSE_BACKENDS`:
#: below the measured break-even, selecting costs more than it saves. 0 = off.
#: Measured on one NVIDIA H200, 2026-12-04 (``scripts/gpu_speed.sh``,
#: results/benchmarks/nvidia-h200-2026-12-04.csv, docs/benchmarks.md): B = 1, 32/8 heads, D = 128, bf16,
#: 95%, ``cab`` with the default options, Triton predictor and Triton attention
#: (``total:cab-default[triton]+triton``) against cuDNN SDPA: 0.845 vs 0.259 ms at 4k, 0.962 vs 0.887 ms
#: at 8k (dense faster), 0.897 vs 3.307 ms at 16k (sparse faster); the summary interpolates ~8532 tokens.
#: The Forman options at 90% (``total:cab[triton]+triton``) cross in the same interval (8k slower, 16k
#: faster). So keys < 8192 -> dense is measured to be faster (at exactly 8192 the sparse path was still
#: 8% slower; between 8k and 16k nothing was measured). The library's default predictor is
#: ``impl="torch"``, not timed with the Triton backend in that run; on the H100 (2026-11-25) it was
#: 2.5-3.2x slower than ``impl="triton"`` at 1k-16k (``predictor:cab[torch]`` vs ``[triton]``,
#: results/benchmarks/nvidia-h100-80gb-hbm3-2026-11-25.csv), so its break-even is not expected below this one.
AUTO_DENSE_BELOW = 8192

#: The backends ``auto`` picks for which :data:`AUTO_DENSE_BELOW` was measured: only the Triton kernel on
#: CUDA. On CPU (``reference``) or with FlexAttention nothing was measured, so ``auto`` selects there.
AUTO_DENSE_BACKENDS = ("triton",)


class _Default:
    """The value of an argument that was not passed (its documented default applies)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Dense attention with GQA and the chunked-prefill causal offset (queries are the last ``Nq``).

    Args: q ``[B, Hq, Nq, D]``, k, v ``[B, Hkv, Nk, D]``. Returns ``[B, Hq, Nq, D]``.
    """
    nq, nk = q.shape[2], k.shape[2]
    mask = None
    if causal:
        rows = torch.arange(nq, device=q.device) + (nk - nq)
        mask = torch.arange(nk, device=q.device)[None, :] <= rows[:, None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    *,
    scale: float | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Exact attention under the selection's token mask, in the inputs' dtype.

    Args: q ``[B, Hq, Nq, D]``, k, v ``[B, Hkv, Nk, D]``. Returns ``[B, Hq, Nq, D]``.
    """
    g = selection.grid
    b, hq, nq, d = q.shape
    hkv, grp = k.shape[1], hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    kt = k.transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, Nk]: shared by the group, not copied
    vv = v.unsqueeze(2)
    out = torch.empty_like(q).view(b, hkv, grp, nq, d)
    qg = q.view(b, hkv, grp, nq, d)
    for r0 in range(0, nq, chunk):
        r1 = min(nq, r0 + chunk)
        keep = selection.token_mask(r0, r1).view(b, hkv, grp, r1 - r0, g.kv_len)
        s = torch.matmul(qg[:, :, :, r0:r1], kt) * scale
        s = s.masked_fill(~keep, float("-inf"))
        p = s.softmax(-1)
        out[:, :, :, r0:r1] = torch.matmul(p, vv)
    return out.view(b, hq, nq, d)


# Every new shape (B, H, N, D, block) recompiles the static-shape FlexAttention. Past dynamo's
# recompile limit (8 by default) dynamo would run flex_attention eagerly, and eager flex_attention
# applies only the mask_mod and ignores the block sparsity (wrong output, N x N memory). So the compiled
# function gets a limit of its own where torch.compile takes one (recompile_limit=, newer torch), and
# otherwise the global limit is raised to at least this, once.
_FLEX_RECOMPILE_LIMIT = 256


@functools.lru_cache(maxsize=None)
def _compiled_flex(max_autotune: bool = False):
    import inspect

    from torch.nn.attention.flex_attention import flex_attention

    kwargs: dict[str, Any] = {"dynamic": False}
    if max_autotune:
        # Inductor's FlexAttention backward filters its tile configurations by the mask's block size
        # *before* it applies the caller's bwd_ options, and without max-autotune it has one configuration:
        # on sm90 at head_dim 128 that is 64 x 128 tiles, which a 64-token (or smaller) block cannot take,
        # so the backward fails with NoValidChoicesError whatever kernel_options say (H200, torch 2.11,
        # 2026-12-04). Max-autotune's list has 32- and 64-wide tiles; the options also reach the backward,
        # which compile_fx patches for its lazy compile.
        kwargs["options"] = {"max_autotune": True}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return torch.compile(flex_attention, recompile_limit=_FLEX_RECOMPILE_LIMIT, **kwargs)
    import torch._dynamo.config as dc

    name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"
    if getattr(dc, name) < _FLEX_RECOMPILE_LIMIT:
        setattr(dc, name, _FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention, **kwargs)


def compiled_flex_attention(max_autotune: bool = False):
    """The library's compiled FlexAttention (static shapes, its own recompile limit), shared by every
    caller (e.g. :mod:`cab_attention.varlen`) so that the limit is counted once.

    Args:
        max_autotune: the compile with Inductor's max-autotune tile list, for calls whose backward runs at
            blocks under 128 tokens: on Hopper at head_dim 64-128 the default backward tile is 64 x 128,
            which such blocks cannot take, and the search list has 32- and 64-wide tiles (see
            :func:`_compiled_flex`). Compiles take longer (a tile search per new shape).
    """
    return _compiled_flex(bool(max_autotune))


def flex_kernel_options(block_size: int, device_type: str, for_backward: bool = False) -> dict[str, Any] | None:
    """Kernel tiles that divide the selection block size (CUDA); ``None`` elsewhere.

    ``for_backward``: the tiles bind only the forward kernel (``fwd_`` keys); the backward's are Inductor's
    (its default tile, or its search under :func:`compiled_flex_attention` ``(max_autotune=True)``)."""
    if device_type != "cuda":
        return None
    prefix = "fwd_" if for_backward else ""
    return {prefix + "BLOCK_M": min(block_size, 128), prefix + "BLOCK_N": min(block_size, 64)}


def check_flex_available(q: torch.Tensor, block_size: int) -> None:
    """Raise ``ValueError`` where the flex backend cannot run."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch < 2.5
        raise ValueError(f"backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5): {e}") from e
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"backend='flex' runs on CUDA or CPU tensors, got device {q.device}; use backend='reference'")
    if q.device.type == "cuda" and block_size < 16:
        raise ValueError(f"backend='flex' on CUDA needs block_size >= 16 (its smallest tile), got {block_size}")
    if q.device.type == "cpu" and q.dtype == torch.float16:
        raise ValueError("backend='flex' on CPU does not support float16; use float32/bfloat16 or backend='reference'")
    if q.dtype == torch.float64:
        # On CPU the inductor lowering fails deep in compilation; say so before compiling.
        raise ValueError(
            f"backend='flex' does not support float64 (q is float64 on {q.device.type}); use float32/bfloat16 "
            "or backend='reference'"
        )


def flex_attention_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: BlockSelection, *, scale: float | None = None
) -> torch.Tensor:
    """FlexAttention over the selection's ``BlockMask``. Shapes as :func:`reference_attention`."""
    g = selection.grid
    bs = g.block_size
    front = g.q_pad_front
    q_total = g.num_q_blocks * bs
    kv_total = g.num_kv_blocks * bs
    qp = F.pad(q, (0, 0, front, q_total - front - g.q_len)) if q_total != g.q_len else q
    if kv_total != g.kv_len:
        k = F.pad(k, (0, 0, 0, kv_total - g.kv_len))
        v = F.pad(v, (0, 0, 0, kv_total - g.kv_len))
    # The transposed (q-block) index is needed only when gradients will flow: FlexAttention refuses a
    # mask without it for inputs that require grad (e.g. CABAttention's projections in training).
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    block_mask = selection.to_block_mask(for_backward=needs_grad)
    out = _compiled_flex()(
        qp,
        k,
        v,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=flex_kernel_options(bs, q.device.type),
    )
    return out[:, :, front : front + g.q_len]


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _triton_kernel_runs(q: torch.Tensor, block_size: int) -> bool:
    """Whether ``backend="triton"`` can run on these inputs (CUDA only: ``auto`` never picks the CPU
    interpreter)."""
    if not _on_cuda(q) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    try:
        from .kernels.attention import check_triton_available
    except ImportError:  # no triton
        return False
    try:
        check_triton_available(q, block_size)
    except ValueError:
        return False
    return True


def auto_backend(q: torch.Tensor, block_size: int) -> str:
    """The backend ``backend="auto"`` runs for these inputs: ``"triton"`` on CUDA for float16, bfloat16
    and float32 where the kernel can run (on an H200 it passed the 2x error rule in all three and ran at
    1.9x FlexAttention's kept-tile rate at 64-token blocks: docs/kernels.md), else ``"flex"`` on CUDA
    (not float64), else ``"reference"``."""
    if _triton_kernel_runs(q, block_size):
        return "triton"
    if _on_cuda(q) and q.dtype != torch.float64:
        return "flex"
    return "reference"


def auto_runs_dense(q: torch.Tensor, k: torch.Tensor, selection: BlockSelection | None, block_size: int = 64,
                    window: int | None = None) -> bool:
    """Whether ``backend="auto"`` skips selection and runs exact dense attention: no selection given, no
    sliding ``window`` (dense SDPA would ignore it), fewer than :data:`AUTO_DENSE_BELOW` keys (``k``
    ``[B, Hkv, Nk, D]``), and ``auto`` would run a backend of :data:`AUTO_DENSE_BACKENDS` (``q``
    ``[B, Hq, Nq, D]``, ``block_size`` as for :func:`auto_backend`)."""
    return (selection is None and window is None and k.shape[2] < AUTO_DENSE_BELOW
            and auto_backend(q, block_size) in AUTO_DENSE_BACKENDS)


def _check_selection(selection: BlockSelection, q: torch.Tensor, k: torch.Tensor, block_size: int, causal: bool):
    if not isinstance(selection, BlockSelection):
        raise ValueError(f"selection must be a BlockSelection from select_blocks, got {type(selection).__name__}")
    want = BlockGrid.of(q, k, selection.grid.block_size, causal, selection.grid.window)
    if selection.grid != want:
        raise ValueError(
            f"selection was made for {selection.grid} but q, k describe {want}; select again for these inputs"
        )
    if selection.grid.block_size != block_size:
        raise ValueError(
            f"selection has block_size={selection.grid.block_size} but block_size={block_size} was passed"
        )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    selection: BlockSelection | None = None,
    selector: str = DEFAULT,  # type: ignore[assignment]
    sparsity: float = DEFAULT,  # type: ignore[assignment]
    causal: bool = True,
    backend: str = "auto",
    block_size: int | None = None,
    check_finite: bool = True,
    **options: Any,
) -> torch.Tensor:
    """Block-sparse attention: select (unless ``selection`` is given), then execute.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` and ``Nq <= Nk``.
        selection: a :class:`BlockSelection` for these inputs; it must keep at least one causally valid
            block in every row. Passing ``selector``, ``sparsity`` or a selector option with it is a
            ``ValueError`` (they would have no effect).
        selector: default :data:`cab_attention.options.DEFAULT_SELECTOR` (``"antidiagonal"``); sparsity: default ``0.9`` (see :func:`cab_attention.select_blocks`);
            ``DEFAULT`` marks "not passed", so that passing either with ``selection`` can be refused.
        block_size: tokens per block (default 64; with ``selection``, the selection's).
        check_finite: raise ``ValueError`` naming q, k or v when it holds NaN or inf (default). The check
            reads the three tensors once and syncs with the host once; pass ``False`` to skip it where the
            inputs are known to be finite (its cost is measured by ``scripts/gpu_house.py``).
        backend: ``"auto"`` (:func:`auto_backend`: triton on CUDA where the kernel runs, else flex on
            CUDA, else reference; where it runs triton, without ``selection`` or ``window`` and below
            :data:`AUTO_DENSE_BELOW` keys, exact dense SDPA instead), ``"reference"``, ``"flex"`` or ``"triton"``.
        **options: selector options (see :func:`cab_attention.select_blocks`); ``scale`` also sets the
            attention scale (default ``D**-0.5``).

    Returns:
        ``[B, Hq, Nq, D]`` in q's dtype.
    """
    check_qkv(q, k, v)
    if not isinstance(check_finite, bool):
        raise ValueError(f"check_finite must be True or False, got {check_finite!r}")
    if selection is not None:
        given = [name for name, val in (("selector", selector), ("sparsity", sparsity)) if val is not DEFAULT]
        given += sorted(set(options) - {"scale"})
        if given:
            raise ValueError(
                f"{', '.join(given)} cannot be combined with selection= (the selection is already made); "
                "pass them to select_blocks instead"
            )
    if block_size is None:
        block_size = selection.grid.block_size if isinstance(selection, BlockSelection) else 64
    check_block_size(block_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    chosen_by_auto = backend == "auto"
    if backend == "auto":
        if auto_runs_dense(q, k, selection, block_size, options.get("window")):
            # The selection arguments are still checked: a bad one is an error at every length.
            check_sparsity(0.9 if sparsity is DEFAULT else sparsity)
            resolve_options(DEFAULT_SELECTOR if selector is DEFAULT else selector, options)
            if not isinstance(causal, bool):
                raise ValueError(f"causal must be True or False, got {causal!r}")
            if check_finite:
                check_finite_fn(q=q, k=k, v=v)
            return dense_attention(q, k, v, causal=causal, scale=options.get("scale"))
        backend = auto_backend(q, block_size)
    if backend == "flex":
        check_flex_available(q, block_size)
    scale = options.get("scale")
    if selection is None:
        if check_finite:
            check_finite_fn(q=q, k=k, v=v)
        selection = select_blocks(
            q, k, selector=DEFAULT_SELECTOR if selector is DEFAULT else selector, sparsity=0.9 if sparsity is DEFAULT else sparsity,
            block_size=block_size, causal=causal, check_finite=False, **options,
        )
    else:
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be True or False, got {causal!r}")
        _check_selection(selection, q, k, block_size, causal)
        selection.check_rows()
        if check_finite:
            check_finite_fn(q=q, k=k, v=v)
    windowed = selection.grid.window is not None
    if q.shape[2] < block_size and not windowed:
        return dense_attention(q, k, v, causal=causal, scale=scale)
    if backend == "triton" and windowed and chosen_by_auto:
        # The Triton kernel masks only the diagonal block; auto takes flex, which applies the window.
        backend = "flex"
        check_flex_available(q, block_size)
    if backend == "triton" and windowed:
        raise ValueError(
            "backend='triton' does not honour a sliding window (its kernel masks only the diagonal block); "
            "use backend='flex' or 'reference' for a windowed selection"
        )
    if q.shape[2] < block_size:  # windowed: the reference applies the window token by token
        return reference_attention(q, k, v, selection, scale=scale)
    if backend == "flex":
        return flex_attention_blocks(q, k, v, selection, scale=scale)
    if backend == "triton":
        try:
            from .kernels.attention import triton_attention_blocks
        except ImportError as e:
            raise ValueError(f"backend='triton' needs triton (pip install -e '.[triton]'): {e}") from e
        return triton_attention_blocks(q, k, v, selection, scale=scale)
    return reference_attention(q, k, v, selection, scale=scale)
