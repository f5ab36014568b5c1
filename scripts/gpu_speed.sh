#!/usr/bin/env bash
# The Speed-II measurement in one device call: `cab bench attention`, `cab bench predictor`,
# `cab bench model` and the summary, each part independent (one failing or timing out loses nothing of
# the others: every bench writes its CSV after each group / length).
#
#   PYTHONPATH=$PWD OUT=/some/dir scripts/gpu_speed.sh [--budget-s 420] [--dry-run] [--only PARTS]
#
# Parts, in this order (the headline 128k figures first, so that a short budget loses the cheap ones):
#   attention128  cab bench attention at 128k: cuDNN / flash / flex dense, the flex and Triton kernels
#                 alone over CAB's masks (64 and 128-token blocks), end to end with both backends for cab,
#                 cab-default and antidiagonal (fused Triton estimator), 95% and 90%
#   predictor     cab bench predictor at 128k, then 1k..64k: cab (triton, triton-bf16, stage breakdown),
#                 cab-default, antidiagonal[triton], and the CUDA-graph predictor up to 16k
#   attention     cab bench attention at 4k, 8k, 16k, 32k, 64k (break-even and the regression table)
#   model         cab bench model: Llama-3-8B-shaped, 4 layers, bf16, 128k / 64k / 32k, dense cuDNN
#                 against hf.enable with antidiagonal and cab (Triton predictor), backends flex and triton
#   summary       cab bench summary: benchmarks.md (no plots on the device) and the compact table
# Files under $OUT (<= 8): <device>-<date>.csv (attention + predictor rows), model.csv, model.md,
# benchmarks.md, summary.txt, logs.tar.gz. Every CSV row records device, date, torch and triton versions.
# --dry-run: the same parts on the CPU at tiny shapes (host timers; tests the script, never results).
set -u

BUDGET=420
DRY=0
ONLY="attention128,predictor,attention,model,summary"
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) BUDGET=$2; shift 2 ;;
    --budget-s=*) BUDGET=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    --only=*) ONLY=${1#*=}; shift ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "gpu_speed.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
BUDGET=${BUDGET%.*}

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-runs/gpu-speed}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$(date +%s)
STEPS=()

STEP_KILL_AFTER=10 STEP_TAIL=3
source "scripts/gpu_steps.sh"  # wants, now, left, min, max, step

# The parts' shares of the budget (seconds at the default 420; scaled for other budgets). Each bench also
# gets an internal --budget-s a little under its hard limit, so that it skips (and records) its last
# cases instead of being killed mid-case.
share() { echo $(( $1 * BUDGET / 420 )); }
RESERVE_SUMMARY=10

if [ $DRY -eq 1 ]; then
  # The Triton attention kernel runs on CPU only in Triton's interpreter: the dry run uses it so that the
  # triton rows and the model's triton backend are exercised too (the predictor stays torch on CPU).
  export TRITON_INTERPRET=1
  COMMON=(--dry-run --rep 1 --warmup 1 --no-plots --batches 1 --out-dir "$OUT")
  N128=(--n 256)
  NSHORT=(--n 128)
  NPRED=(--n 128,256)
  MODEL=(--dry-run --n 128 --layers 1 --selectors antidiagonal,cab --backends reference,triton --impls torch
         --repeats 1 --block-size 32 --out "$OUT/model")
  BS=(--block-sizes 32,64)
  IMPL=(--impl torch)
else
  COMMON=(--rep 30 --warmup 10 --no-plots --batches 1 --out-dir "$OUT")
  N128=(--n 128k)
  NSHORT=(--n 4k,8k,16k,32k,64k)
  NPRED=(--n 1k,2k,4k,8k,16k,32k,64k)
  MODEL=(--n 128k,64k,32k --layers 4 --selectors antidiagonal,cab --backends flex,triton --impls triton
         --repeats 3 --block-size 64 --out "$OUT/model")
  BS=(--block-sizes 64,128)
  IMPL=(--impl triton,triton-bf16)
fi
SEL=(--selectors cab,cab-default,antidiagonal --sparsities 0.95,0.9 --max-antidiagonal-n 32k)

echo "gpu_speed.sh: budget ${BUDGET}s, out $OUT, parts $ONLY, dry-run $DRY"
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  $PY -c "import transformers; print('transformers', transformers.__version__)" 2>&1
} >"$LOGS/env.log" 2>&1
cat "$LOGS/env.log"

if wants attention128; then
  lim=$(min "$(share 150)" $(( $(left) - RESERVE_SUMMARY )))
  step attention128 "$lim" $PY -m cab_eval.cli bench attention "${COMMON[@]}" "${N128[@]}" "${BS[@]}" "${SEL[@]}" \
    "${IMPL[@]}" --budget-s $(( lim > 20 ? lim - 15 : lim ))
fi
if wants predictor; then
  # 128k first (the targets), then the short lengths (graphs, break-even), sharing one CSV.
  lim=$(min "$(share 35)" $(( $(left) - RESERVE_SUMMARY )))
  step predictor128 "$lim" $PY -m cab_eval.cli bench predictor "${COMMON[@]}" "${N128[@]}" "${BS[@]}" \
    --selectors cab,cab-default,antidiagonal --sparsities 0.95 "${IMPL[@]}" --budget-s $(( lim > 20 ? lim - 10 : lim ))
  lim=$(min "$(share 45)" $(( $(left) - RESERVE_SUMMARY )))
  step predictor "$lim" $PY -m cab_eval.cli bench predictor "${COMMON[@]}" "${NPRED[@]}" "${BS[@]}" \
    --selectors cab,cab-default,antidiagonal --sparsities 0.95 "${IMPL[@]}" --graph-max-n 16k \
    --budget-s $(( lim > 20 ? lim - 10 : lim ))
fi
if wants attention; then
  lim=$(min "$(share 80)" $(( $(left) - RESERVE_SUMMARY )))
  step attention "$lim" $PY -m cab_eval.cli bench attention "${COMMON[@]}" "${NSHORT[@]}" "${BS[@]}" "${SEL[@]}" \
    "${IMPL[@]}" --budget-s $(( lim > 20 ? lim - 10 : lim ))
fi
if wants model; then
  lim=$(min "$(share 100)" $(( $(left) - RESERVE_SUMMARY )))
  step model "$lim" $PY -m cab_eval.cli bench model "${MODEL[@]}"
fi

CSV=$(ls -t "$OUT"/*.csv 2>/dev/null | head -n 1)
if wants summary && [ -n "$CSV" ]; then
  step summary "$(min 30 "$(left)")" $PY -m cab_eval.cli bench summary --csv "$CSV" --out "$OUT/benchmarks.md" --no-plots
  $PY -m cab_eval.cli bench summary --csv "$CSV" --compact >"$OUT/summary.txt" 2>&1
fi
[ -f "$OUT/model/model.csv" ] && mv "$OUT/model/model.csv" "$OUT/model.csv"
[ -f "$OUT/model/summary.md" ] && mv "$OUT/model/summary.md" "$OUT/model.md"
rmdir "$OUT/model" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"

echo
echo "== gpu_speed.sh done in $(( $(now) - START ))s (budget ${BUDGET}s); files:"
ls -1 "$OUT"
echo "== steps"
for s in "${STEPS[@]}"; do echo "  $s" | tr '|' ' '; done
[ -f "$OUT/model.md" ] && { echo "== model (ms per forward; attention share; speedups vs dense cuDNN)"; cat "$OUT/model.md"; }
[ -f "$OUT/summary.txt" ] && { echo "== summary"; cat "$OUT/summary.txt"; }
exit 0
