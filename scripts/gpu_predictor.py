#!/usr/bin/env python
"""GPU check and timing of the fast predictors: the fused antidiagonal estimator, the radix selection
kernel and the CUDA-graph path (cab_attention/kernels/{antidiagonal,radix_select,graphs}.py).

    PYTHONPATH=$PWD python3 scripts/gpu_predictor.py --out $OUT       # ~2-3 min on one H200
    PYTHONPATH=$PWD python scripts/gpu_predictor.py --smoke            # the script's logic on CPU

Checks (a status per row: PASS = identical selections; NEAR = some rows differ by float32 summation
order, at most 1e-3 of the rows and a mean relative kept-priority gap <= 1e-5; FAIL otherwise; exit 1
on any FAIL):

* ``select_blocks(impl="triton")`` against ``impl="torch"`` for ``cab`` (default options),
  ``magnitude`` and ``antidiagonal``, N = 8k / 32k / 128k, 32 query / 8 KV heads, D = 128, bf16 and
  fp32 inputs, block 64, sparsity 0.95;
* the radix selection kernel against the 64-bit key kernel and ``rank_order`` on tie-heavy priorities;
* ``predict_graphed`` against the eager predictor (two different inputs through one captured graph).

Timings (``triton.testing.do_bench`` medians in ms, bf16 inputs, sparsity 0.95, B = 1, 32/8 heads,
D = 128; inputs rotated where they fit in L2): each predictor from ``q, k`` to the ``BlockSelection``
(no FlexAttention BlockMask) at N = 1k/4k/8k/32k/128k and 64-/128-token blocks: ``cab`` (default
options, float32 scores: what ``impl="triton"`` runs), ``cab-bf16`` (``precision="bf16"``),
``magnitude``, ``antidiagonal`` (one pass, partials in a 512 MiB scratch; ``-scratch4g``: 4 GiB, more
heads per launch; ``-2pass``: logits recomputed),
the graphed variants (N <= 8k), and the selection stage alone with the
new and the old kernel; peak memory beyond the inputs (``torch.cuda.max_memory_allocated`` delta).
Writes ``predictor_checks.csv``, ``predictor_times.csv`` and ``gpu_predictor.log`` under ``--out``;
prints a short table last.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

import cab_attention as cab  # noqa: E402
from cab_attention import kernels as K  # noqa: E402
from cab_attention.geometry import BlockGrid  # noqa: E402
from cab_attention.select import keep_first, kv_layout, rank_order  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
HQ, HKV, D = (4, 2, 32) if SMOKE else (32, 8, 128)
SPARSITY = 0.95
CHECKS: list[dict] = []
TIMES: list[dict] = []
LOG = None


def log(msg: str) -> None:
    print(msg, flush=True)
    if LOG is not None:
        LOG.write(msg + "\n")
        LOG.flush()


def free() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def qk(n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(1, HQ, n, D, device=DEV, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(1, HKV, n, D, device=DEV, generator=g, dtype=torch.float32).to(dtype)
    return q, k


def check(name: str, n: int, dtype: str, status: str, detail: str = "") -> None:
    CHECKS.append(dict(check=name, n=n, dtype=dtype, status=status, detail=detail))
    log(f"{status:5s} {name} N={n} {dtype} {detail}")


def compare(ref, got, prio=None) -> tuple[str, str]:
    """(status, detail): identical, or the share of rows that differ and the kept-priority gap."""
    same = (torch.equal(ref.mask, got.mask) and torch.equal(ref.kv_num_blocks, got.kv_num_blocks)
            and torch.equal(ref.kv_indices, got.kv_indices))
    if same:
        return "PASS", "identical"
    rows = (ref.mask != got.mask).any(-1).float().mean().item()
    budgets = torch.equal(ref.kv_num_blocks, got.kv_num_blocks)
    gap = float("nan")
    if prio is not None:
        free_ = ref.valid & ~ref.grid.forced(ref.mask.device)
        p = torch.nan_to_num(prio.float(), nan=0.0, posinf=0.0, neginf=0.0)
        best = (p * (ref.mask & free_)).sum(-1)
        kept = (p * (got.mask & free_)).sum(-1)
        gap = ((best - kept) / best.abs().clamp_min(1e-12)).mean().item()
    near = budgets and rows <= 1e-3 and abs(gap) <= 1e-5
    return ("NEAR" if near else "FAIL"), f"rows differing {rows:.2e}, kept-priority gap {gap:.2e}, budgets equal {budgets}"


def guarded(fn):
    def run(*a, **kw):
        try:
            fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - a crash is a failed check; keep going
            traceback.print_exc()
            check(fn.__name__, kw.get("n", 0), "-", "FAIL", f"raised {type(e).__name__}: {str(e)[:300]}")
        finally:
            free()

    return run


# ------------------------------------------------------------------------------------------ checks


@guarded
def check_identity(n: int, dtype: torch.dtype) -> None:
    q, k = qk(n, dtype, seed=n)
    dn = str(dtype).replace("torch.", "")
    for selector in ("cab", "magnitude", "antidiagonal"):
        kw = dict(selector=selector, sparsity=SPARSITY, block_size=64)
        ref = cab.select_blocks(q, k, return_diagnostics=True, **kw)
        prio = ref.diagnostics["priority"]
        got = cab.select_blocks(q, k, impl="triton", **kw)
        status, detail = compare(ref, got, prio)
        check(f"identity {selector} torch vs triton", n, dn, status, detail)
        del ref, got, prio
        free()


@guarded
def check_radix_select(n: int) -> None:
    grid = BlockGrid(1, 2, 1, n, n, D, 64, True)
    mq, mk = grid.num_q_blocks, grid.num_kv_blocks
    g = torch.Generator(device=DEV).manual_seed(n)
    p = torch.randint(-3, 4, (1, 2, mq, mk), device=DEV, generator=g).float()
    p[torch.rand(p.shape, device=DEV, generator=g) < 0.1] = float("nan")
    p[torch.rand(p.shape, device=DEV, generator=g) < 0.05] = float("-inf")
    p[torch.rand(p.shape, device=DEV, generator=g) < 0.1] = -0.0
    noise = torch.rand(p.shape, device=DEV, generator=g) < 0.3
    p[noise] = torch.randn(p.shape, device=DEV, generator=g)[noise]
    valid, forced = grid.valid(DEV), grid.forced(DEV)
    for s in (0.0, 0.9, 0.98):
        budget = grid.budget(s, DEV)
        want = keep_first(rank_order(p, valid, forced), budget)
        num_w, idx_w = kv_layout(want)
        new = K.select_rows(p, budget, grid.block_offset, True, method="radix")
        old = K.select_rows(p, budget, grid.block_offset, True, method="bits64")
        ok = torch.equal(new[0], want) and torch.equal(new[1], num_w) and torch.equal(new[2], idx_w)
        ok = ok and all(torch.equal(a, b) for a, b in zip(new, old))
        check(f"radix select vs rank_order and bits64 (s={s})", n, "fp32", "PASS" if ok else "FAIL")


@guarded
def check_graphs(n: int) -> None:
    if DEV != "cuda":
        check("graphed vs eager", n, "bf16", "SKIP", "needs CUDA")
        return
    cache = K.GraphCache()
    for selector in ("cab", "magnitude", "antidiagonal"):
        for bs in (64, 128):
            ok = True
            for seed in (1, 2):  # the second call replays the graph on new inputs
                q, k = qk(n, torch.bfloat16, seed=seed + n)
                kw = dict(selector=selector, sparsity=SPARSITY, block_size=bs)
                eager = cab.select_blocks(q, k, impl="triton", **kw)
                got = K.predict_graphed(q, k, cache=cache, **kw)
                ok = ok and compare(eager, got)[0] == "PASS"
            check(f"graphed vs eager {selector} bs{bs}", n, "bf16", "PASS" if ok else "FAIL",
                  f"cache hits {cache.hits} misses {cache.misses}")


# ----------------------------------------------------------------------------------------- timings


def bench(fn) -> float:
    if DEV != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def wall_ms(fn, target_s: float = 0.1) -> float:
    """Host-clock time per call over back-to-back calls (launch and Python overhead included: what
    a caller sees at short lengths, where do_bench's cache flush between calls can hide the host)."""
    if DEV == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    est = time.perf_counter() - t0
    n = max(3, min(100, int(target_s / max(est, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def peak_mib(fn) -> float:
    if DEV != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def variants(bs: int, n: int):
    """(name, fn(q, k)) of every predictor timed at this block size and length."""
    kw = dict(sparsity=SPARSITY, block_size=bs)
    out = [
        ("cab", lambda q, k: cab.select_blocks(q, k, selector="cab", impl="triton", **kw)),
        ("cab-bf16", lambda q, k: K.predict(q, k, selector="cab", precision="bf16", **kw)),
        ("magnitude", lambda q, k: cab.select_blocks(q, k, selector="magnitude", impl="triton", **kw)),
        ("antidiagonal", lambda q, k: cab.select_blocks(q, k, selector="antidiagonal", impl="triton", **kw)),
        ("antidiagonal-2pass", lambda q, k: K.predict_antidiagonal(q, k, passes=2, **kw)),
    ]
    if n >= 32768:  # the one-pass scratch bound decides how many heads share a launch
        out.append(("antidiagonal-scratch4g", lambda q, k: K.predict_antidiagonal(q, k, scratch_mib=4096, **kw)))
    if n <= 8192 and DEV == "cuda":
        cache = K.GraphCache()
        out += [
            ("cab[graph]", lambda q, k: K.predict_graphed(q, k, selector="cab", cache=cache, **kw)),
            ("cab-bf16[graph]", lambda q, k: K.predict_graphed(q, k, selector="cab", precision="bf16", cache=cache, **kw)),
            ("magnitude[graph]", lambda q, k: K.predict_graphed(q, k, selector="magnitude", cache=cache, **kw)),
            ("antidiagonal[graph]", lambda q, k: K.predict_graphed(q, k, selector="antidiagonal", cache=cache, **kw)),
        ]
    return out


def time_length(n: int, deadline: float) -> None:
    in_bytes = (HQ + HKV) * n * D * 2
    sets = [qk(n, torch.bfloat16, seed=100 + i) for i in range(min(8, max(1, math.ceil(192 * 2**20 / in_bytes))))]
    counter = [0]

    def rotating(f):
        def run():
            counter[0] += 1
            q, k = sets[counter[0] % len(sets)]
            return f(q, k)

        return run

    for bs in (64, 128):
        for name, f in variants(bs, n):
            if time.time() > deadline:
                TIMES.append(dict(predictor=name, n=n, block_size=bs, ms=float("nan"), wall_ms=float("nan"),
                                  peak_mib=float("nan"), note="skipped: time budget"))
                continue
            try:
                f(*sets[0])  # compile / capture outside the timing
                ms = bench(rotating(f))
                wall = wall_ms(rotating(f)) if not SMOKE else ms
                mem = peak_mib(lambda: f(*sets[0]))
                TIMES.append(dict(predictor=name, n=n, block_size=bs, ms=ms, wall_ms=wall, peak_mib=mem, note=""))
                log(f"time {name:22s} N={n:6d} bs={bs:3d} {ms:9.3f} ms (wall {wall:9.3f} ms/call)  "
                    f"peak beyond inputs {mem:8.1f} MiB")
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                TIMES.append(dict(predictor=name, n=n, block_size=bs, ms=float("nan"), wall_ms=float("nan"),
                                  peak_mib=float("nan"), note=f"raised {type(e).__name__}: {str(e)[:200]}"))
            free()
        # The selection stage alone: the radix kernel (default) against the 64-bit key kernel.
        if time.time() > deadline:
            continue
        try:
            q, k = sets[0]
            grid = BlockGrid.of(q, k, bs, True)
            qc, kc = K.coarsen_stage(q, k, grid, "mean")
            prio = K.score_stage(qc, kc, grid, selector="cab", precision="bf16").priority
            budget = K.budget_for(grid, SPARSITY, DEV)
            warps = (1, 2, 4, 8) if n == max(LENGTHS) else (None,)
            for method, w in [("bits64", None)] + [("radix", w) for w in warps]:
                if method == "radix":
                    f = lambda w=w: K.radix_select_rows(prio, budget, grid.block_offset, True, num_warps=w)  # noqa: E731
                else:
                    f = lambda: K.select_rows(prio, budget, grid.block_offset, True, method="bits64")  # noqa: E731
                f()
                ms = bench(f)
                name = f"select[{method}{'' if w is None else f',w{w}'}]"
                TIMES.append(dict(predictor=name, n=n, block_size=bs, ms=ms, wall_ms=float("nan"), peak_mib=float("nan"),
                                  note="stage alone"))
                log(f"time {name:22s} N={n:6d} bs={bs:3d} {ms:9.3f} ms")
            del qc, kc, prio
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            log(f"select stage timing failed: {type(e).__name__}: {e}")
        free()
    del sets
    free()


# -------------------------------------------------------------------------------------------- main


def cell(r: dict | None, key: str = "ms") -> str:
    if r is None:
        return "-"
    return "skip" if math.isnan(r[key]) else f"{r[key]:.3f}"

LENGTHS = [256, 512] if SMOKE else [1024, 4096, 8192, 32768, 131072]


def main() -> int:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_predictor"))
    ap.add_argument("--smoke", action="store_true", help="CPU (Triton interpreter), tiny shapes")
    ap.add_argument("--budget-s", type=float, default=165.0, help="stop starting timings after this many seconds")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    LOG = open(os.path.join(args.out, "gpu_predictor.log"), "w")
    t0 = time.time()
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (TRITON_INTERPRET=1)"
    log(f"device {device}; torch {torch.__version__}; triton {triton.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    check_lengths = [200] if SMOKE else [8192, 32768, 131072]
    for n in check_lengths:
        for dtype in (torch.bfloat16, torch.float32):
            check_identity(n=n, dtype=dtype)
    check_radix_select(n=300 if SMOKE else 131072)
    for n in ([256] if SMOKE else [1024, 4096, 8192]):
        check_graphs(n=n)
    log(f"checks done in {time.time() - t0:.0f} s")
    if not args.no_bench:
        deadline = t0 + args.budget_s
        for n in sorted(LENGTHS, key=lambda n: (n != max(LENGTHS), n)):  # the 128k targets first
            time_length(n, deadline)
    with open(os.path.join(args.out, "predictor_checks.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["check", "n", "dtype", "status", "detail"])
        w.writeheader()
        w.writerows(CHECKS)
    with open(os.path.join(args.out, "predictor_times.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "predictor", "n", "block_size", "ms", "wall_ms", "peak_mib", "note"])
        w.writeheader()
        w.writerows([dict(device=device, **r) for r in TIMES])
    # The short table, last.
    counts = {s: sum(r["status"] == s for r in CHECKS) for s in ("PASS", "NEAR", "FAIL", "SKIP")}
    log(f"\n== {device}, {time.time() - t0:.0f} s; checks: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for r in CHECKS:
        if r["status"] in ("NEAR", "FAIL"):
            log(f"   {r['status']} {r['check']} N={r['n']} {r['dtype']}: {r['detail']}")
    names = list(dict.fromkeys(r["predictor"] for r in TIMES))
    for bs, key in ((64, "ms"), (128, "ms"), (64, "wall_ms"), (128, "wall_ms")):
        what = "do_bench median ms" if key == "ms" else "host-clock ms per back-to-back call"
        log(f"-- {what}, block {bs}; [peak MiB beyond inputs at the largest N]")
        log(f"{'predictor':22s}" + "".join(f"{str(n // 1024) + 'k' if n >= 1024 else str(n):>10s}" for n in LENGTHS))
        for name in names:
            row = {r["n"]: r for r in TIMES if r["predictor"] == name and r["block_size"] == bs}
            if not row:
                continue
            if all(math.isnan(r[key]) for r in row.values()) and key == "wall_ms":
                continue
            cells = "".join(f"{cell(row.get(n), key):>10s}" for n in LENGTHS)
            big = row.get(max(LENGTHS))
            mem = f"  [{big['peak_mib']:.0f}]" if big and not math.isnan(big["peak_mib"]) else ""
            log(f"{name:22s}{cells}{mem}")
    LOG.close()
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
