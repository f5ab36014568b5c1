"""Quick CUDA smoke test of the core path (flex vs reference, a few timings). Used once early to catch
API differences on the GPU image (torch 2.11); the full check is scripts/gpu_check.sh."""
import sys, time, torch
sys.path.insert(0, ".")
import cab_attention as cab
from triton.testing import do_bench

print(torch.__version__, torch.cuda.get_device_name(0))
torch.manual_seed(0)
dev = "cuda"
fails = 0
for (b, hq, hkv, nq, nk, d, bs, dt) in [
    (1, 4, 2, 1000, 1000, 64, 64, torch.bfloat16),
    (2, 8, 2, 777, 1300, 128, 64, torch.bfloat16),
    (1, 4, 4, 2048, 2048, 64, 128, torch.float16),
    (1, 4, 1, 513, 513, 128, 32, torch.float32),
]:
    q = torch.randn(b, hq, nq, d, device=dev, dtype=dt)
    k = torch.randn(b, hkv, nk, d, device=dev, dtype=dt)
    v = torch.randn(b, hkv, nk, d, device=dev, dtype=dt)
    for sel in cab.SELECTORS:
        for s in (0.0, 0.8):
            selection = cab.select_blocks(q, k, selector=sel, sparsity=s, block_size=bs)
            ref32 = cab.reference_attention(q.float(), k.float(), v.float(), selection)
            ref = cab.reference_attention(q, k, v, selection)
            fl = cab.sparse_attention(q, k, v, selection=selection, block_size=bs, backend="flex")
            e_ref = (ref.float() - ref32).abs().max().item()
            e_fl = (fl.float() - ref32).abs().max().item()
            ok = e_fl <= 2 * e_ref + 1e-5
            fails += not ok
            if not ok or sel == "cab":
                print(f"{'OK ' if ok else 'BAD'} {sel:12s} s={s} shape={(b,hq,hkv,nq,nk,d,bs)} {dt} flex_err={e_fl:.2e} ref_err={e_ref:.2e}")
print("fails", fails)
# Timings at the anchor shape.
for n in (8192, 32768, 131072):
    q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, 8, n, 128, device=dev, dtype=torch.bfloat16)
    from torch.nn.attention import sdpa_kernel, SDPBackend
    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    try:
        t_cudnn = do_bench(cudnn, warmup=25, rep=100, return_mode="median")
    except Exception as e:
        t_cudnn = float("nan"); print("cudnn failed", e)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t_pred = do_bench(lambda: cab.select_blocks(q, k, selector="cab", sparsity=0.95), warmup=10, rep=50, return_mode="median")
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    t_mag = do_bench(lambda: cab.select_blocks(q, k, selector="magnitude", sparsity=0.95), warmup=10, rep=50, return_mode="median")
    selection = cab.select_blocks(q, k, selector="cab", sparsity=0.95)
    t_bm = do_bench(lambda: selection.to_block_mask(), warmup=10, rep=50, return_mode="median")
    t_att = do_bench(lambda: cab.sparse_attention(q, k, v, selection=selection, backend="flex"), warmup=10, rep=50, return_mode="median")
    print(f"N={n} cudnn={t_cudnn:.2f}ms torch-predictor cab={t_pred:.2f}ms (peak {peak:.0f} MiB) magnitude={t_mag:.2f}ms blockmask={t_bm:.2f}ms flex-sparse(95%, bs64)={t_att:.2f}ms density={selection.density:.3f}")
