#!/usr/bin/env bash
# The RULER-style retrieval suite (cab eval ruler) on the lent GPU: Gemma-3-270M at 8k/16k/32k (three
# NIAH tasks) or SmolLM2-135M at 8k (all six tasks); dense once, then oracle, antidiagonal, magnitude,
# streaming, cab, vertical_slash, flexprefill and cab_graph at sparsity 0.9 and 0.95 (17 methods). Sliding
# layers stay dense (hf.enable's default): for Gemma only the full layers 5, 11, 17 are sparse, and the
# density reported is theirs.
#
# Step 1, CPU (this machine, ~1 min: mostly loading the Gemma GGUF tokenizer), from the repo root:
#     bash scripts/gpu_ruler.sh build [gemma3] [smollm2]    # runs/gpu-ids-<model>/ruler.json.gz
# The device's transformers builds a wrong Gemma-3 tokenizer (RESEARCH.md section 8): prompts are token
# ids built here, BOS first when the model expects it (Gemma), and every run records a known sentence's
# token count under both tokenizers.
# Step 2, GPU: the GGUF (and the gguf wheel) in $CAB_MODEL_DIR (default /root/m), one call carrying
# ["runs/gpu-ids-<model>"], after the recall half (scripts/gpu_recall.sh):
#     bash scripts/gpu_recall.sh gemma3; bash scripts/gpu_ruler.sh gemma3      # <= 540 s in all
#     bash scripts/gpu_recall.sh smollm2; bash scripts/gpu_ruler.sh smollm2    # <= 240 s in all
# Writes $OUT/ruler-<model>.tgz and $OUT/ruler-table.txt, and appends to $OUT/steps.txt.
# Time (unmeasured on the GPU; the run's own seconds go to steps.txt): the run starts no new batch after
# --time-limit (Gemma 160 s, SmolLM2 45 s; every batch runs all 17 methods on the same prompts, so what
# ran is paired; prompts are ordered sample-major, so a cut run covers every (task, length, depth) cell
# with its first samples) and is killed at a hard limit (Gemma 215 s, SmolLM2 65 s; a killed run's
# trials are re-scored from its CSV, 20 s at most). Worst case with setup and tar: Gemma ~245 s,
# SmolLM2 ~95 s; with the recall half (Gemma <= ~275 s, SmolLM2 <= ~130 s) one call stays within 540 s
# (Gemma) and 240 s (SmolLM2).
# If the decode check fails on the device, re-score on the CPU:
#     python -m cab_eval.evaluate.ruler_run score --model gemma3 --out <unpacked ruler-gemma3>
set -u
# Gemma: the two primary lengths only (8k is not decisive and ran on 2026-12-04); 4 samples a cell so that
# a run cut by its time limit can be resumed (RULER_RESUME=1) on the same prompts.
GEMMA_GRID=(--tasks niah_single,niah_multikey,niah_multivalue --lengths 16384,32640
            --depths 0.1,0.5,0.9 --samples 4)
SMOL_GRID=(--tasks niah_single,niah_multikey,niah_multivalue,variable_tracking,cwe,fwe --lengths 8000
           --depths 0.1,0.5,0.9 --samples 4)
SELECTORS="dense,oracle,antidiagonal,magnitude,streaming,cab,vertical_slash,flexprefill,cab_graph"
ids_dir() { echo "runs/gpu-ids-$1"; }

if [ "${1:-}" = "build" ]; then
  shift
  PY=${PY:-.venv/bin/python}
  [ -x "$PY" ] || PY=/work/main/.venv/bin/python
  for model in ${*:-gemma3 smollm2}; do
    case $model in gemma3) grid=("${GEMMA_GRID[@]}") ;; smollm2) grid=("${SMOL_GRID[@]}") ;;
      *) echo "unknown model $model (gemma3, smollm2)"; exit 1 ;; esac
    dir=$(ids_dir "$model")
    mkdir -p "$dir"
    PYTHONPATH=$PWD "$PY" -m cab_eval.evaluate.ruler_run build --model "$model" "${grid[@]}" \
      --out "$dir/ruler.json.gz" || exit 1
    du -sh "$dir"/ruler.json.gz
  done
  exit 0
fi

MODEL=${1:-}
case $MODEL in
  gemma3) LIMIT=${RULER_LIMIT:-160}; HARD=${RULER_HARD:-215}; BATCH=2 ;;
  smollm2) LIMIT=${RULER_LIMIT:-45}; HARD=${RULER_HARD:-65}; BATCH=4 ;;
  *) echo "usage: bash scripts/gpu_ruler.sh build [models] | gemma3 | smollm2"; exit 1 ;;
esac
IDS=$(ids_dir "$MODEL")/ruler.json.gz
OUT=${OUT:-runs/gpu-ruler}
source "$(dirname "$0")/gpu_model_env.sh"
model_env "$IDS"

t0=$SECONDS
dir=runs/gpu/ruler-$MODEL
RESUME=()
if [ "${RULER_RESUME:-0}" = 1 ] && [ -s "$dir/ruler_trials.csv" ]; then
  RESUME=(--resume)  # continue the trials of an earlier call on this (still warm) machine
else
  rm -rf "$dir" && mkdir -p "$dir"
fi
timeout "$HARD" python3 -m cab_eval.evaluate.ruler_run run --model "$MODEL" --token-ids "$IDS" --device cuda \
  --dtype bfloat16 --selectors "$SELECTORS" --sparsities 0.9,0.95 --batch "$BATCH" --time-limit "$LIMIT" \
  --no-progress --out "$dir" ${RESUME[@]+"${RESUME[@]}"} >> "$dir/run.log" 2>&1
rc=$?
if [ $rc -ne 0 ] && [ -s "$dir/ruler_trials.csv" ]; then  # killed or failed: write outputs from the CSV
  timeout 20 python3 -m cab_eval.evaluate.ruler_run score --model "$MODEL" --out "$dir" >> "$dir/run.log" 2>&1
fi
echo "ruler-$MODEL rc=$rc $((SECONDS - t0))s trials=$(($(wc -l < "$dir/ruler_trials.csv" 2>/dev/null || echo 1) - 1))" | tee -a "$OUT/steps.txt"
tar czf "$OUT/ruler-$MODEL.tgz" -C runs/gpu "ruler-$MODEL"
grep -E "tokenizer check|^\| " "$dir/run.log" | head -n 40 | tee "$OUT/ruler-table.txt"
cat "$OUT/steps.txt"
