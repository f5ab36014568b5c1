"""Which FlexAttention kernel options let NSA's flex branches run forward AND backward on the GPU.

The 2026-12-04 H200 run of scripts/gpu_nsa.py failed in every NSA case with Inductor's NoValidChoicesError:
the library's flex options (``BLOCK_M``/``BLOCK_N`` dividing the selection block) also bind the backward
kernels. This tries three option sets on one shape (bf16, 32/8 heads, D=128, block 64, N=8192) and reports
which compiles, with forward and forward+backward times (median of 5 CUDA-event timings)."""

import statistics
import time

import torch

import cab_attention.nsa as nsa
from cab_attention.nsa import NSAAttention

VARIANTS = {
    "shared BLOCK_M/N (as run)": {"BLOCK_M": 64, "BLOCK_N": 64},
    "fwd_ only": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64},
    "fwd_ + bwd 32/64/64/32, 1 stage": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64,
                                        "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_stages": 1},
}


def main() -> None:
    dev = torch.device("cuda")
    n, hq, hkv, d = 8192, 32, 8, 128
    for name, opts in VARIANTS.items():
        nsa.flex_kernel_options = lambda bs, t, for_backward=False, o=opts: dict(o)
        torch._dynamo.reset()
        m = NSAAttention(d, hq, hkv, block_size=64, num_selected=16, window=512, selection="nsa", backend="flex").to(dev, torch.bfloat16)
        q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        t0 = time.time()
        fwd_ok = "fwd failed"
        try:
            out = m(q, k, v)
            torch.cuda.synchronize()
            fwd_ok = "fwd ok"
            out.sum().backward()
            torch.cuda.synchronize()
            times = {}
            for label, bwd in (("fwd", False), ("fwd+bwd", True)):
                ts = []
                for _ in range(5):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    o = m(q, k, v)
                    if bwd:
                        o.sum().backward()
                    e.record()
                    torch.cuda.synchronize()
                    ts.append(s.elapsed_time(e))
                times[label] = statistics.median(ts)
            print(f"{name:36s} OK   fwd {times['fwd']:.2f} ms  fwd+bwd {times['fwd+bwd']:.2f} ms  ({time.time() - t0:.0f} s)", flush=True)
        except Exception as ex:  # the point of the script: which options fail, and how
            print(f"{name:36s} FAIL ({fwd_ok}): {type(ex).__name__}: "
                  f"{str(ex).splitlines()[0][:200]} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    main()
