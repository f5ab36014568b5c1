"""Triton predictor kernels against the PyTorch reference path, on CPU under ``TRITON_INTERPRET=1``.

Every test name contains ``triton`` and carries ``@pytest.mark.triton`` (``pytest -k triton``). Shapes
are small: the interpreter runs each program in Python. Selections are compared *exactly* (mask,
``kv_num_blocks``, ``kv_indices``): float32 kernels round like the reference up to summation order, and
the seeded random inputs hold no near-ties at that level; the selection kernel itself is checked on
priorities built with exact ties, NaN, infinities and signed zeros. The bf16 fast path is approximate
and is compared by the reference score of what it keeps. ``scripts/gpu_kernels.py`` runs the same checks
on CUDA at large shapes; ``python -m cab_attention.kernels.aot`` compiles every kernel for sm_90.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")

import cab_attention as cab  # noqa: E402
from cab_attention import score as S  # noqa: E402
from cab_attention.coarsen import coarsen as coarsen_ref  # noqa: E402
from cab_attention.geometry import BlockGrid  # noqa: E402
from cab_attention.select import keep_first, kv_layout, rank_order  # noqa: E402
from cab_attention import select as SEL  # noqa: E402
from cab_attention.selection import block_mask  # noqa: E402


def _load_kernels():
    """Import the kernels in interpreter mode, re-decorating them if they were imported without it."""
    import cab_attention.kernels as K

    if K.unavailable_reason("cpu", torch.float32) is not None:
        for name in ("coarsen", "scores", "topk", "predictor"):
            importlib.reload(importlib.import_module(f"cab_attention.kernels.{name}"))
        K = importlib.reload(K)
    return K


K = _load_kernels()
pytestmark = pytest.mark.triton


def _qk(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k


def _same_selection(a, b):
    assert a.mask.shape == b.mask.shape
    assert torch.equal(a.mask, b.mask), f"{(a.mask != b.mask).sum().item()} mask entries differ"
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
    assert torch.equal(a.kv_indices, b.kv_indices)


# (B, Hq, Hkv, Nq, Nk, D, block_size, causal): odd N, chunked prefill (Nq < Nk), GQA, B > 1, bs 16/32/64.
SHAPES = [
    (1, 2, 1, 100, 100, 16, 16, True),
    (2, 2, 1, 70, 150, 32, 16, True),
    (1, 3, 3, 97, 97, 32, 16, False),
    (1, 4, 1, 129, 300, 64, 32, True),
    (2, 1, 1, 200, 200, 64, 32, True),
    (1, 2, 1, 255, 255, 32, 64, True),
    (1, 2, 2, 190, 321, 64, 64, False),
]


# ------------------------------------------------------------------------------------------- coarsen


@pytest.mark.parametrize("shape", SHAPES[:5])
@pytest.mark.parametrize("method", ["max_l2", "mean", "max"])
def test_triton_coarsen_matches_reference(shape, method):
    b, hq, hkv, nq, nk, d, bs, causal = shape
    for dtype in (torch.float32, torch.bfloat16):
        q, k = _qk(b, hq, hkv, nq, nk, d, dtype)
        grid = BlockGrid.of(q, k, bs, causal)
        qc, kc = K.coarsen_qk(q, k, bs, method, grid.q_pad_front)
        rq = coarsen_ref(q, bs, method, pad_front=grid.q_pad_front)
        rk = coarsen_ref(k, bs, method)
        assert qc.dtype == dtype and qc.shape == rq.shape and kc.shape == rk.shape
        if method == "mean":
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(qc.float(), rq.float(), atol=tol, rtol=tol)
            torch.testing.assert_close(kc.float(), rk.float(), atol=tol, rtol=tol)
        else:
            assert torch.equal(qc, rq) and torch.equal(kc, rk)


def test_triton_coarsen_ties_go_to_the_earliest_token():
    x = torch.zeros(1, 1, 40, 4)
    x[0, 0, 3] = torch.tensor([1.0, 0, 0, 0])
    x[0, 0, 9] = torch.tensor([0, -1.0, 0, 0])  # same norm, later: loses
    x[0, 0, 20:] = 0.0  # an all-zero block: the earliest real token wins
    qc, kc = K.coarsen_qk(x, x, 16, "max_l2", q_pad_front=5)
    assert torch.equal(qc, coarsen_ref(x, 16, "max_l2", pad_front=5))
    assert torch.equal(kc, coarsen_ref(x, 16, "max_l2"))
    assert torch.equal(kc[0, 0, 0], x[0, 0, 3])


# -------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_triton_scores_match_reference(shape):
    b, hq, hkv, nq, nk, d, bs, causal = shape
    q, k = _qk(b, hq, hkv, nq, nk, d)
    grid = BlockGrid.of(q, k, bs, causal)
    valid = grid.valid()
    scale = d**-0.5
    qc = coarsen_ref(q, bs, pad_front=grid.q_pad_front)
    kc = coarsen_ref(k, bs)
    logits = S.coarse_logits(qc, kc, scale)
    a = S.affinity(logits, valid)
    r = S.redundancy(a, grid)
    out = K.affinity(qc, kc, grid.block_offset, causal, scale, logits=True, a=True, sums=True, rowmax=True)
    v = valid.expand_as(a)
    torch.testing.assert_close(out["logits"][v], logits[v], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["A"][v], a[v], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["S_out"], a.sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["S_in"], a.sum(-2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["A_rowmax"], a.amax(-1), rtol=1e-6, atol=0)
    cases = [
        ("forman", "blocks", "lowest", S.augmented_forman(a, r)),
        ("triangle", "blocks", "highest", S.triangle_proxy(a, r, 0.5, "blocks")),
        ("triangle", "none", "lowest", S.triangle_proxy(a, r, 0.3, "none")),
        ("triangle", "rowmax", "lowest", S.triangle_proxy(a, r, 0.7, "rowmax")),
    ]
    for score, norm, keep, f in cases:
        lam = {"blocks": 0.5, "none": 0.3, "rowmax": 0.7}[norm] if score == "triangle" else 0.5
        prio = K.redundancy_scores(
            out["A"], grid.block_offset, causal, score=score, keep=keep, lam=lam, norm=norm,
            s_out=out["S_out"], s_in=out["S_in"], a_rowmax=out["A_rowmax"],
        )
        want = -f if keep == "lowest" else f
        torch.testing.assert_close(prio[v], want[v], rtol=1e-5, atol=1e-5, msg=f"{score}/{norm}/{keep}")


# ------------------------------------------------------------------------------------------- select


def _tie_heavy_priority(b, h, mq, mk, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(-3, 4, (b, h, mq, mk), generator=g).float()  # many exact ties
    p[torch.rand(p.shape, generator=g) < 0.1] = float("nan")
    p[torch.rand(p.shape, generator=g) < 0.05] = float("inf")
    p[torch.rand(p.shape, generator=g) < 0.05] = float("-inf")
    zero = torch.rand(p.shape, generator=g) < 0.15
    sign = torch.rand(p.shape, generator=g) < 0.5
    p[zero & sign] = -0.0
    p[zero & ~sign] = 0.0
    return p


@pytest.mark.parametrize(
    "b,h,nq,nk,bs,causal",
    [(2, 2, 100, 100, 16, True), (1, 2, 70, 300, 16, True), (2, 1, 97, 97, 16, False), (1, 1, 300, 1000, 32, True)],
)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_triton_select_matches_rank_order_on_ties(b, h, nq, nk, bs, causal, sparsity):
    q, k = _qk(b, h, 1, nq, nk, 4)
    grid = BlockGrid.of(q, k, bs, causal)
    valid, forced = grid.valid(), grid.forced()
    prio = _tie_heavy_priority(b, h, grid.num_q_blocks, grid.num_kv_blocks, seed=int(sparsity * 10) + nq)
    budget = grid.budget(sparsity)
    mask_ref = keep_first(rank_order(prio, valid, forced), budget)
    num_ref, idx_ref = kv_layout(mask_ref)
    mask, num, idx = K.select_rows(prio, budget, grid.block_offset, causal)
    assert torch.equal(mask, mask_ref)
    assert torch.equal(num, num_ref) and torch.equal(idx, idx_ref)
    # A narrower index holds the same kept prefix.
    w = int(budget.max())
    _, num2, idx2 = K.select_rows(prio, budget, grid.block_offset, causal, write_mask=False, index_width=w)
    assert torch.equal(num2, num_ref) and torch.equal(idx2, idx_ref[..., :w])
    # With a candidate mask: non-forced blocks outside it are never kept.
    g = torch.Generator().manual_seed(1)
    cand = (torch.rand(prio.shape, generator=g) < 0.6) | forced
    free = (valid & ~forced & cand).sum(-1)
    nf = (valid & forced).sum(-1)
    kb = torch.minimum(budget, nf + free).min(dim=0).values.min(dim=0).values  # a budget every row can fill
    mask_c, _, _ = K.select_rows(prio, kb, grid.block_offset, causal, candidates=cand)
    want = keep_first(rank_order(prio, valid & cand, forced), kb)
    assert torch.equal(mask_c, want)


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_predict_matches_select_blocks(shape):
    b, hq, hkv, nq, nk, d, bs, causal = shape
    q, k = _qk(b, hq, hkv, nq, nk, d, seed=hash(shape) % 1000)
    configs = [
        ("magnitude", {}),
        ("cab", {}),
        ("cab", {"score": "forman", "keep": "lowest", "coarsen": "max_l2"}),  # FORMAN_KEEP_LOWEST_MAXL2
        ("cab", {"score": "forman", "redundancy": "matmul", "coarsen": "max_l2"}),
        ("cab", {"score": "triangle", "norm": "rowmax", "lam": 0.8}),
        ("cab", {"hybrid": 0.3, "keep": "highest"}),
        ("cab", {"share_kv": True}),
        ("cab", {"redundancy": "matmul", "score": "triangle"}),
        ("cab", {"head_chunk": 1, "share_kv": shape[1] > shape[2]}),
    ]
    for n, (selector, opts) in enumerate(configs):
        sparsity = (0.6, 0.9)[(n + SHAPES.index(shape)) % 2]
        ref_opts = {key: val for key, val in opts.items() if key not in ("redundancy", "head_chunk")}
        ref = cab.select_blocks(q, k, selector=selector, sparsity=sparsity, block_size=bs, causal=causal, **ref_opts)
        got = K.predict(q, k, selector=selector, sparsity=sparsity, block_size=bs, causal=causal, **opts)
        _same_selection(ref, got)
        assert got.shared_kv == ref.shared_kv and got.grid == ref.grid


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_predict_half_inputs(dtype):
    q, k = _qk(2, 4, 2, 99, 160, 64, dtype)
    for selector in ("magnitude", "cab"):
        ref = cab.select_blocks(q, k, selector=selector, sparsity=0.7, block_size=16)
        _same_selection(ref, K.predict(q, k, selector=selector, sparsity=0.7, block_size=16))


def test_triton_bf16_precision_keeps_nearly_the_best_blocks():
    """The fast path (A in bf16) may reorder near-ties: judge it by the reference priority it keeps."""
    q, k = _qk(1, 4, 2, 400, 400, 64)
    ref = cab.select_blocks(q, k, selector="cab", sparsity=0.8, block_size=16, return_diagnostics=True)
    got = K.predict(q, k, selector="cab", sparsity=0.8, block_size=16, precision="bf16")
    assert torch.equal(got.kv_num_blocks, ref.kv_num_blocks)
    prio = ref.diagnostics["priority"]
    free = ref.valid & ~BlockGrid.forced(ref.grid)
    best = (prio * (ref.mask & free)).sum(-1)
    kept = (prio * (got.mask & free)).sum(-1)
    gap = (best - kept) / best.abs().clamp_min(1e-6)
    assert (gap >= -1e-6).all()  # nothing beats the exact top-k
    assert gap.mean() < 1e-3 and (got.mask == ref.mask).float().mean() > 0.98


def test_triton_dense_paths():
    q, k = _qk(1, 2, 1, 10, 100, 16)  # fewer queries than a block: dense
    _same_selection(cab.select_blocks(q, k, block_size=16), K.predict(q, k, block_size=16))
    q, k = _qk(1, 2, 1, 64, 64, 16)
    _same_selection(
        cab.select_blocks(q, k, selector="dense", block_size=16), K.predict(q, k, selector="dense", block_size=16)
    )


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[6]])
def test_triton_two_stage_matches_torch_two_stage(shape):
    from cab_attention.kernels.reference import two_stage_reference

    b, hq, hkv, nq, nk, d, bs, causal = shape
    q, k = _qk(b, hq, hkv, nq, nk, d, seed=7)
    for sparsity, keep, norm in ((0.5, "lowest", "blocks"), (0.8, "highest", "none")):
        ref = two_stage_reference(q, k, block_size=bs, sparsity=sparsity, causal=causal, keep=keep, norm=norm)
        got = K.predict(
            q, k, block_size=bs, sparsity=sparsity, causal=causal, selector="cab", score="triangle", keep=keep,
            norm=norm, two_stage=True,
        )
        _same_selection(ref, got)


def test_triton_two_stage_is_exact_when_candidates_cover_the_row():
    """Where 2 r_i >= free_i in every row (here sparsity 0.2), every free block is a candidate and the
    two-stage rule equals the one-stage triangle selection."""
    from cab_attention.kernels.reference import two_stage_reference

    q, k = _qk(1, 2, 1, 160, 160, 32, seed=3)
    grid = BlockGrid.of(q, k, 16, True)
    cb = K.candidate_budget(grid, K.budget_for(grid, 0.2, "cpu"))
    assert torch.equal(cb.long(), grid.valid().sum(-1))
    one = cab.select_blocks(q, k, selector="cab", score="triangle", sparsity=0.2, block_size=16)
    _same_selection(one, two_stage_reference(q, k, block_size=16, sparsity=0.2))
    _same_selection(one, K.predict(q, k, block_size=16, sparsity=0.2, score="triangle", two_stage=True))


# ---------------------------------------------------------------------------- select_blocks option


def test_triton_impl_option_of_select_blocks():
    q, k = _qk(2, 2, 1, 100, 100, 32)
    for selector in ("cab", "magnitude", "dense"):
        _same_selection(
            cab.select_blocks(q, k, selector=selector, sparsity=0.8, block_size=16),
            cab.select_blocks(q, k, selector=selector, sparsity=0.8, block_size=16, impl="triton"),
        )
    v = torch.randn_like(k)
    out_t = cab.sparse_attention(q, k, v, selector="cab", sparsity=0.8, block_size=16, impl="triton", backend="reference")
    out_r = cab.sparse_attention(q, k, v, selector="cab", sparsity=0.8, block_size=16, backend="reference")
    assert torch.equal(out_t, out_r)
    bad = [
        dict(selector="streaming", impl="triton"),
        dict(selector="cab", impl="triton", threshold=0.9),
        dict(selector="cab", impl="triton", return_diagnostics=True),
        dict(selector="cab", impl="cuda"),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            cab.select_blocks(q, k, block_size=16, **kw)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        cab.select_blocks(q.double(), k.double(), block_size=16, impl="triton")
    with pytest.raises(ValueError, match="two_stage"):
        K.predict(q, k, block_size=16, score="forman", two_stage=True)
    with pytest.raises(ValueError, match="precision"):
        K.predict(q, k, block_size=16, precision="fp8")


# ------------------------------------------------------------------------ torch stages = Triton stages


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]])
@pytest.mark.parametrize("selector,opts", [("cab", {}), ("cab", {"score": "forman", "keep": "lowest"}), ("magnitude", {})])
def test_triton_stages_match_torch_stages(shape, selector, opts):
    b, hq, hkv, nq, nk, d, bs, causal = shape
    q, k = _qk(b, hq, hkv, nq, nk, d, seed=5)
    grid = BlockGrid.of(q, k, bs, causal)
    qc, kc = SEL.coarsen_stage(q, k, grid, "mean")
    qc_t, kc_t = K.coarsen_stage(q, k, grid, "mean")
    torch.testing.assert_close(qc_t, qc, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kc_t, kc, atol=1e-6, rtol=1e-6)
    valid = grid.valid()
    p = SEL.score_stage(qc, kc, grid, selector=selector, **opts).priority
    p_t = K.score_stage(qc, kc, grid, selector=selector, **opts).priority
    torch.testing.assert_close(p_t[..., valid], p[..., valid], atol=1e-4, rtol=1e-4)
    budget = grid.budget(0.6)
    m, n, i = SEL.select_stage(p, grid, budget)
    m_t, n_t, i_t = K.select_stage(p, grid, budget.to(torch.int32))
    assert torch.equal(m_t, m) and torch.equal(n_t, n) and torch.equal(i_t, i)


# ---------------------------------------------------------------------------------------- mask build


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[6]])
def test_triton_block_mask_matches_to_block_mask(shape):
    b, hq, hkv, nq, nk, d, bs, causal = shape
    q, k = _qk(b, hq, hkv, nq, nk, d)
    for share in (False, True):
        sel = K.predict(q, k, sparsity=0.7, block_size=bs, causal=causal, share_kv=share)
        want = sel.to_block_mask()
        got = block_mask(sel, fast=True)  # the one builder, reaching K.block_mask

        def blocks(num, idx):
            mk = sel.grid.num_kv_blocks
            hit = torch.arange(idx.shape[-1]) < num[..., None]
            out = torch.zeros(*num.shape, mk + 1, dtype=torch.bool)
            out.scatter_(-1, torch.where(hit, idx.long(), mk), True)
            return out[..., :mk]

        assert torch.equal(blocks(got.kv_num_blocks, got.kv_indices), blocks(want.kv_num_blocks, want.kv_indices))
        assert torch.equal(
            blocks(got.full_kv_num_blocks, got.full_kv_indices), blocks(want.full_kv_num_blocks, want.full_kv_indices)
        )
        assert got.BLOCK_SIZE == want.BLOCK_SIZE and got.seq_lengths == want.seq_lengths


# ------------------------------------------------------------------------------------ torch.compile


def test_triton_compiled_forward_one_compile_per_bucket():
    """One compile (fullgraph) for the 256 bucket; a second length in it must not recompile."""
    import torch._dynamo

    from cab_attention.kernels.compiled import bucket_length, cab_attention_compiled

    assert bucket_length(200, "pow2", 256, 16) == 256 and bucket_length(1500, "pow2", 1024, 64) == 2048
    assert bucket_length(1500, 1024, block_size=64) == 2048 and bucket_length(1024, 1024) == 1024
    torch._dynamo.reset()
    for i, n in enumerate((200, 170)):
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, 4, n, 32, generator=g)
        k, v = torch.randn(2, 1, 2, n, 32, generator=g).unbind(0)
        with torch._dynamo.config.patch(error_on_recompile=(i > 0)):
            out = cab_attention_compiled(q, k, v, sparsity=0.7, block_size=16, min_bucket=256)
        sel = K.predict(q, k, sparsity=0.7, block_size=16)
        ref = cab.reference_attention(q, k, v, sel)
        assert out.shape == q.shape
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- GPU lowering (AOT)


def test_triton_kernels_lower_to_sm90_cubin():
    """The interpreter accepts code the compiler rejects: lower a representative kernel set to sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as e:  # pragma: no cover
        pytest.skip(f"triton's NVIDIA backend is not installed: {e}")
    proc = subprocess.run(
        [sys.executable, "-m", "cab_attention.kernels.aot", "--quick"],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
