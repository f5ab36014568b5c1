"""Cost of the NaN/inf input check (``check_finite``) against the block-sparse forward it guards, on a GPU.

Shapes: B=1, 32 query / 8 KV heads, D=128, bfloat16, N = 32k and 128k (self-attention prefill),
block 64, sparsity 0.9, selector ``magnitude`` (the cheapest predictor, so the check's share is the
largest it gets). Timed with ``triton.testing.do_bench`` (CUDA events, median); q, k, v are far larger
than L2 (q alone is 256 MB at 32k), so no rotation is needed. Rows:

* ``check``: :func:`cab_attention.geometry.check_finite` of q, k, v (one aminmax each + one host sync);
* ``rows``: :meth:`BlockSelection.check_rows` (the empty-row check ``sparse_attention`` runs on a given
  selection: one reduction over the block mask + one host sync);
* ``flex``: ``sparse_attention(selection=..., backend="flex", check_finite=False)``;
* ``flex+check``: the same with ``check_finite=True``;
* ``e2e`` / ``e2e+check``: select + execute (``sparse_attention(selector="magnitude", ...)``) without / with.

Also checks that a NaN planted on the GPU is caught and named. Expected run time on an H200: < 60 s
(two FlexAttention compilations dominate). Run from the repository root:

    PYTHONPATH=$PWD python3 scripts/gpu_house.py     # writes $OUT/gpu_house.csv when $OUT is set
"""

from __future__ import annotations

import csv
import os
import sys
import time

import torch

sys.path.insert(0, ".")
import cab_attention as cab  # noqa: E402
from cab_attention.geometry import check_finite  # noqa: E402


def main() -> int:
    from triton.testing import do_bench

    t_start = time.perf_counter()
    dev = "cuda"
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    bench = dict(warmup=25, rep=100, return_mode="median")
    rows = []
    torch.manual_seed(0)
    for n in (32768, 131072):
        q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 8, n, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, 8, n, 128, device=dev, dtype=torch.bfloat16)
        # The check must catch a NaN on this device and name the tensor.
        k2 = k.clone()
        k2[0, 3, n // 2, 7] = float("nan")
        try:
            check_finite(q=q, k=k2, v=v)
            caught = "NOT CAUGHT"
        except ValueError as e:
            caught = "caught" if str(e).startswith("k holds NaN") else f"wrong message: {e}"
        del k2
        sel = cab.select_blocks(q, k, selector="magnitude", sparsity=0.9, check_finite=False)
        kw = dict(selection=sel, backend="flex")
        cab.sparse_attention(q, k, v, check_finite=False, **kw)  # compile
        t = {
            "check": do_bench(lambda: check_finite(q=q, k=k, v=v), **bench),
            "rows": do_bench(lambda: sel.check_rows(), **bench),
            "flex": do_bench(lambda: cab.sparse_attention(q, k, v, check_finite=False, **kw), **bench),
            "flex+check": do_bench(lambda: cab.sparse_attention(q, k, v, check_finite=True, **kw), **bench),
            "e2e": do_bench(lambda: cab.sparse_attention(q, k, v, selector="magnitude", sparsity=0.9, backend="flex",
                                                         check_finite=False), **bench),
            "e2e+check": do_bench(lambda: cab.sparse_attention(q, k, v, selector="magnitude", sparsity=0.9,
                                                               backend="flex", check_finite=True), **bench),
        }
        row = {"device": name, "n": n, "nan_check": caught, **{f"{key}_ms": round(val, 4) for key, val in t.items()}}
        row["check_share_of_flex"] = round(t["check"] / t["flex"], 4)
        row["check_share_of_e2e"] = round(t["check"] / t["e2e"], 4)
        rows.append(row)
        print(row, flush=True)
        del q, k, v, sel
        torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_house.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(f"\ncheck_finite cost on {name} (B=1, Hq=32, Hkv=8, D=128, bf16, block 64, sparsity 0.9, median ms)")
    print(f"{'N':>7} {'check':>8} {'rows':>7} {'flex':>8} {'flex+chk':>9} {'e2e':>8} {'e2e+chk':>8} "
          f"{'chk/flex':>9} {'chk/e2e':>8} nan")
    for r in rows:
        print(f"{r['n']:>7} {r['check_ms']:>8.3f} {r['rows_ms']:>7.3f} {r['flex_ms']:>8.3f} {r['flex+check_ms']:>9.3f} "
              f"{r['e2e_ms']:>8.3f} {r['e2e+check_ms']:>8.3f} {r['check_share_of_flex']:>9.1%} "
              f"{r['check_share_of_e2e']:>8.1%} {r['nan_check']}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0 if all(r["nan_check"] == "caught" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
