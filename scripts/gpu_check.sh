#!/usr/bin/env bash
# The one script to run on the lent GPU: correctness gate, kernel checks, benchmarks, summary.
#
#   scripts/gpu_check.sh [--budget-s 540] [--quick] [--kernels-s 90] [--only STEPS] [--bench-args "..."]
#
# Everything goes under ${OUT:-runs/gpu}: the results CSV (<device>-<date>.csv, also copied into
# results/benchmarks/ of this tree), its two PNG plots, benchmarks.md (the generated docs page),
# summary.txt (the compact table printed at the end) and logs.tar.gz (one log per step, packed at the
# end so that $OUT holds few files). A failing step does not stop the others. The total wall time stays
# within --budget-s: each step gets a share and a hard timeout, and the benchmarks skip their largest
# cases when time runs short (skips are rows in the CSV). --quick: fewer shapes and lengths (a smoke
# run of the script itself). --kernels-s: cap on scripts/gpu_kernels.py (run with --no-bench: the
# benchmarks below time the kernels; 0 skips it). --only: a comma list of steps to run, from
# correctness,kernels,predictor,attention,summary (default all). --bench-args: extra arguments for
# both `cab bench` commands (e.g. "--n 8k,128k").
set -u

BUDGET=540
QUICK=0
BENCH_ARGS=""
KERNELS_S=90
ONLY="correctness,kernels,predictor,attention,summary"
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) BUDGET=$2; shift 2 ;;
    --budget-s=*) BUDGET=${1#*=}; shift ;;
    --kernels-s) KERNELS_S=$2; shift 2 ;;
    --kernels-s=*) KERNELS_S=${1#*=}; shift ;;
    --only) ONLY=$2; shift 2 ;;
    --only=*) ONLY=${1#*=}; shift ;;
    --quick) QUICK=1; shift ;;
    --bench-args) BENCH_ARGS=$2; shift 2 ;;
    --bench-args=*) BENCH_ARGS=${1#*=}; shift ;;
    -h|--help) sed -n 2,18p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
BUDGET=${BUDGET%.*}

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT/logs"
LOGS="$OUT/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$(date +%s)
STEPS=()

STEP_KILL_AFTER=15 STEP_TAIL=4
source "scripts/gpu_steps.sh"  # wants, now, left, min, max, step

# 1. environment
{
  echo "date: $(date -Is)"; echo "budget: ${BUDGET}s; quick: $QUICK; bench args: $BENCH_ARGS"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no git') $(git status --short 2>/dev/null | wc -l) changed files"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  $PY - <<'EOF' 2>&1
import sys, platform
print("python", sys.version.split()[0], platform.platform())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "SMs", p.multi_processor_count)
        print("cudnn", torch.backends.cudnn.version())
except Exception as e:
    print("torch import failed:", e)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
EOF
} >"$LOGS/env.log" 2>&1
STEPS+=("env|ok|$(( $(now) - START ))")
head -n 3 "$LOGS/env.log"
grep -E "^(torch|triton|device|cudnn) " "$LOGS/env.log"

CSV_NAME=$($PY -c "from cab_eval.benchmark.io import environment as e; d = e(True); print(d['slug'] + '-' + d['date'] + '.csv')" 2>/dev/null || echo "gpu-$(date +%F).csv")
CSV="$OUT/$CSV_NAME"

# 2. correctness gate (flex backend)
QFLAG=""; [ "$QUICK" = 1 ] && QFLAG="--quick"
if wants correctness; then
  step correctness "$(min 150 $(( $(left) / 4 )))" $PY scripts/gpu_correctness.py --log "$LOGS/correctness-table.log" $QFLAG
fi

# 3. kernel checks (written by the kernel engineer), when present; capped, timings left to step 4-5
if wants kernels && [ "${KERNELS_S%.*}" -gt 0 ]; then
  if [ -f scripts/gpu_kernels.py ]; then
    step kernels "$(min "${KERNELS_S%.*}" $(( $(left) / 4 )))" $PY scripts/gpu_kernels.py --no-bench
  else
    echo "== kernels: scripts/gpu_kernels.py not present, skipped"
    STEPS+=("kernels|absent|0")
  fi
fi

# 4-5. benchmarks: the predictor gets about 30% of what is left, attention the rest.
RESERVE=30
if [ "$QUICK" = 1 ]; then
  GRID="--n 1k,8k,32k,128k --batches 32 --batch-n 8k"
else
  GRID=""
fi
L=$(( $(left) - RESERVE ))
if wants predictor; then
  if wants attention; then PB=$(max 0 $(( L * 3 / 10 ))); else PB=$(max 0 $(( L - 40 ))); fi
  step bench-predictor "$(( PB + 40 ))" $PY -m cab_eval.cli bench predictor --budget-s "$PB" --csv "$CSV" --out-dir "$OUT" --fresh --no-plots $GRID $BENCH_ARGS
fi
if wants attention; then
  FRESH=""; wants predictor || FRESH="--fresh"
  AB=$(max 0 $(( $(left) - RESERVE - 40 )))
  step bench-attention "$(( AB + 40 ))" $PY -m cab_eval.cli bench attention --budget-s "$AB" --csv "$CSV" --out-dir "$OUT" --no-plots $FRESH $GRID $BENCH_ARGS
fi

# 6. summary: the docs page and plots from the CSV (in $OUT, and in this tree's docs/ and results/benchmarks/)
if wants summary && [ -f "$CSV" ]; then
  mkdir -p results/benchmarks
  cp "$CSV" results/benchmarks/ 2>/dev/null
  step summary 60 $PY -m cab_eval.cli bench summary --csv "$CSV" --out "$OUT/benchmarks.md" --plots-dir "$OUT"
  $PY -m cab_eval.cli bench summary --csv "results/benchmarks/$CSV_NAME" --out docs/benchmarks.md \
    --plots-dir results/benchmarks >>"$LOGS/summary.log" 2>&1
else
  echo "== summary: no CSV at $CSV, skipped"
  STEPS+=("summary|no-csv|0")
fi

# 7. compact final table
{
  echo "gpu_check.sh: total $(( $(now) - START ))s of ${BUDGET}s budget"
  printf '%-18s %-18s %6s\n' step result seconds
  for s in "${STEPS[@]}"; do IFS='|' read -r a b c <<<"$s"; printf '%-18s %-18s %6s\n' "$a" "$b" "$c"; done
  echo
  grep -E "^gpu_correctness: [0-9]+/" "$LOGS/correctness.log" 2>/dev/null || echo "correctness: no summary line (see logs/correctness.log)"
  grep -E "^(FAIL|ERROR)" "$LOGS/correctness.log" 2>/dev/null | head -n 20
  echo
  if [ -f "$CSV" ]; then $PY -m cab_eval.cli bench summary --csv "$CSV" --compact 2>&1; fi
} >"$OUT/summary.txt" 2>&1
echo
cat "$OUT/summary.txt"

# 8. pack the per-step logs into one file ($OUT must hold few files to come back)
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
echo
echo "files under $OUT:"
ls -la "$OUT"
