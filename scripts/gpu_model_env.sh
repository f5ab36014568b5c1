# Sourced by scripts/gpu_recall.sh and scripts/gpu_ruler.sh: the device-side set-up both share. Needs
# MODEL (gemma3 | smollm2) and OUT; sets GGUF (the staged file's name), checks that the GGUF and the
# given token-id files exist, installs the staged gguf wheel when the device lacks it, exports the
# environment of the runs and records the device in $OUT/device.txt.
#     model_env FILE...     (the token-id files this script reads)
model_env() {
  case $MODEL in
    gemma3) GGUF=gemma-3-270m-q4_k_m.gguf ;;
    smollm2) GGUF=SmolLM2-135M-Instruct.Q4_1.gguf ;;
  esac
  export CAB_MODEL_DIR=${CAB_MODEL_DIR:-/root/m}
  mkdir -p "$OUT"
  for f in "$@" "$CAB_MODEL_DIR/$GGUF"; do
    [ -f "$f" ] || { echo "missing $f (build the ids on the CPU side; stage the GGUF in \$CAB_MODEL_DIR)"; exit 1; }
  done
  python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site "$CAB_MODEL_DIR"/gguf-*.whl
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CAB_CACHE_DIR=${CAB_CACHE_DIR:-$CAB_MODEL_DIR/cache}
  [ -f "$OUT/device.txt" ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt"
}
