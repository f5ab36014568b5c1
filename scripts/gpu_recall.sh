#!/usr/bin/env bash
# Attention recall of every pre-registered selector-search candidate (docs/results.md, "Pre-registered
# selector search (2026-12-04)"): Gemma-3-270M at 8k/16k/32k (its full-attention layers 5, 11, 17; the
# sliding layers run with their real window masks, dense, and are not measured) or SmolLM2-135M at 8k
# (all 30 layers); sparsity 0.9 and 0.95, block 64, every candidate at the same exact total of kept blocks.
#
# Step 1, CPU (this machine, ~1 min, mostly the Gemma GGUF tokenizer), from the repo root:
#     bash scripts/gpu_recall.sh build [gemma3] [smollm2]
# writes runs/gpu-ids-<model>/recall-<length>.pt.gz (token ids, gzip) and recall-tokens.json (BOS and a
# known sentence's token count). The device's transformers builds a wrong Gemma-3 tokenizer (RESEARCH.md
# section 8), so ids are built here: disjoint windows of the Paul Graham essays, BOS first when the model
# expects it (cab_eval.evaluate.text.model_bos: Gemma yes, SmolLM2 no).
# Step 2, GPU: the model's GGUF (and the gguf wheel) in $CAB_MODEL_DIR (default /root/m), one call
# carrying ["runs/gpu-ids-<model>"]; together with the ruler half (scripts/gpu_ruler.sh):
#     bash scripts/gpu_recall.sh gemma3; bash scripts/gpu_ruler.sh gemma3      # <= 540 s in all
#     bash scripts/gpu_recall.sh smollm2; bash scripts/gpu_ruler.sh smollm2    # <= 240 s in all
# Writes $OUT/recall-<model>.tgz (one folder per length: recall.csv grows window by window, so a cell
# cut by its time limit keeps its finished windows), $OUT/recall-table.txt, and appends to
# $OUT/steps.txt; device.txt and recall-tokens.json beside them.
# Time limits (hard, per step; unmeasured on the GPU: the numbers of a real run go to steps.txt): model
# conversion 90 s (Gemma; ~0 when $CAB_CACHE_DIR already holds it) / 40 s (SmolLM2); Gemma recall 16k
# 50 s, 32k 75 s, 8k 40 s (3 layers x windows x 24 configurations x 2 sparsities; the oracle's O(N^2)
# selections dominate); SmolLM2 8k 80 s (30 layers). Worst case with setup, table and tar: Gemma
# ~275 s, SmolLM2 ~130 s.
set -u
GEMMA_WINDOWS=(8192:6 16384:4 32768:3)  # windows (= bootstrap clusters) per length
SMOL_WINDOWS=(8192:6)
ids_dir() { echo "runs/gpu-ids-$1"; }

if [ "${1:-}" = "build" ]; then
  shift
  PY=${PY:-.venv/bin/python}
  [ -x "$PY" ] || PY=/work/main/.venv/bin/python
  for model in ${*:-gemma3 smollm2}; do
    case $model in gemma3) grid="${GEMMA_WINDOWS[*]}" ;; smollm2) grid="${SMOL_WINDOWS[*]}" ;;
      *) echo "unknown model $model (gemma3, smollm2)"; exit 1 ;; esac
    dir=$(ids_dir "$model")
    mkdir -p "$dir"
    PYTHONPATH=$PWD "$PY" - "$dir" "$model" "$grid" <<'EOF' || exit 1
import gzip, io, json, pathlib, sys
import torch
from transformers import AutoConfig, AutoTokenizer
from cab_attention import hf
from cab_eval.evaluate.ruler import CHECK_SENTENCE
from cab_eval.evaluate.text import haystack_windows, model_bos

out, model, grid = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
p = hf.find_gemma3_gguf() if model == "gemma3" else hf.find_smollm2_gguf()
tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
bos_id, reason = model_bos(tok, cfg)
info = {"model": model, "gguf": p.name, "bos_token_id": bos_id, "bos_reason": reason, "known_sentence": CHECK_SENTENCE,
        "known_tokens": len(tok(CHECK_SENTENCE, add_special_tokens=False)["input_ids"]), "files": {}}
for item in grid.split():
    length, count = map(int, item.split(":"))
    head = [] if bos_id is None else [bos_id]
    wins = haystack_windows(tok, length - len(head), count, seed=0)
    ids = torch.tensor([head + w for w in wins], dtype=torch.long)
    buf = io.BytesIO()
    torch.save(ids, buf)
    f = out / f"recall-{length}.pt.gz"
    f.write_bytes(gzip.compress(buf.getvalue(), 9))
    info["files"][f.name] = list(ids.shape)
    print(f"{f}: {tuple(ids.shape)}, {f.stat().st_size / 1e6:.2f} MB")
(out / "recall-tokens.json").write_text(json.dumps(info, indent=1))
print(json.dumps({k: info[k] for k in ("model", "bos_token_id", "bos_reason", "known_tokens")}))
EOF
    du -sh "$dir"
  done
  exit 0
fi

MODEL=${1:-}
case $MODEL in
  gemma3) LAYERS=5,11,17; CONVERT=180  # the conversion took 84 s on the H200 (2026-12-04); 90 s killed it
          CELLS=("16384 70" "32768 100" "8192 40") ;;
  smollm2) LAYERS=""; CONVERT=40; CELLS=("8192 80") ;;
  *) echo "usage: bash scripts/gpu_recall.sh build [models] | gemma3 | smollm2"; exit 1 ;;
esac
IDS=$(ids_dir "$MODEL")
OUT=${OUT:-runs/gpu-recall}
source "$(dirname "$0")/gpu_model_env.sh"
model_env "$IDS/recall-tokens.json"
cp "$IDS/recall-tokens.json" "$OUT/"

# The candidates, exactly as registered (label@selector:options). Allocation variants are computed for
# every mass-estimating candidate; the decision uses those of the best two (docs/results.md).
CONFIGS=(oracle antidiagonal vertical_slash flexprefill magnitude streaming cab
  "graph2hop@cab_graph" "graph2hop-ad@cab_graph:affinity=antidiagonal" "graph-l0@cab_graph:lam=0"
  "antidiagonal-head@antidiagonal:allocation=head" "antidiagonal-layer@antidiagonal:allocation=layer"
  "vertical_slash-head@vertical_slash:allocation=head" "vertical_slash-layer@vertical_slash:allocation=layer"
  "flexprefill-head@flexprefill:allocation=head" "flexprefill-layer@flexprefill:allocation=layer"
  "magnitude-head@magnitude:allocation=head" "magnitude-layer@magnitude:allocation=layer"
  "graph2hop-head@cab_graph:allocation=head" "graph2hop-layer@cab_graph:allocation=layer"
  "graph2hop-ad-head@cab_graph:affinity=antidiagonal,allocation=head"
  "graph2hop-ad-layer@cab_graph:affinity=antidiagonal,allocation=layer"
  # Exploratory upper bounds for the allocation variants (amendment in docs/results.md; not in the rule).
  "oracle-head@oracle:allocation=head" "oracle-layer@oracle:allocation=layer")

t0=$SECONDS
# Convert the GGUF once into $CAB_CACHE_DIR/<model> (later loads take about a second).
timeout "$CONVERT" python3 -c "from cab_attention import hf; hf.load_model('$MODEL', device='cpu')" > /dev/null 2>&1
echo "recall-$MODEL convert rc=$? $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
WORK=runs/gpu/recall-$MODEL
rm -rf "$WORK" && mkdir -p "$WORK/ids"
for cell in "${CELLS[@]}"; do
  set -- $cell
  length=$1 secs=$2 t0=$SECONDS dir=$WORK/$1
  mkdir -p "$dir"
  gunzip -c "$IDS/recall-$length.pt.gz" > "$WORK/ids/$length.pt"
  lay=(); [ -n "$LAYERS" ] && lay=(--layers "$LAYERS")
  timeout "$secs" python3 -m cab_attention.cli eval recall --device cuda --model "$MODEL" --ids "$WORK/ids/$length.pt" \
    "${lay[@]}" --sparsities 0.9,0.95 --block-size 64 --no-progress --out "$dir" --configs "${CONFIGS[@]}" \
    > "$dir/run.log" 2>&1
  rc=$?
  done_w=$(python3 -c "import csv,sys; print(len({r['window'] for r in csv.DictReader(open('$dir/recall.csv'))}))" 2>/dev/null || echo 0)
  echo "recall-$MODEL-$length rc=$rc $((SECONDS - t0))s windows=$done_w" | tee -a "$OUT/steps.txt"
done
rm -rf "$WORK/ids"

# Short table: mean recall per method and cell, and the paired difference against antidiagonal with its
# 95% cluster-bootstrap interval over windows (the pre-registered statistic; the decision is made in
# docs/results.md from these files, not here). Read from recall.csv, so cut cells count their windows.
python3 - "$WORK" <<'EOF' 2>&1 | tee "$OUT/recall-table.txt"
import pathlib, sys
from cab_eval.evaluate.ablation import method_means, paired
from cab_eval.evaluate.recall import TEXT_FIELDS
from cab_eval.evaluate.report import RowsFile
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/recall.csv")):
    rows = RowsFile(f, TEXT_FIELDS).read()
    if not rows:
        print(f"\n{f.parent}: no finished window")
        continue
    wins = sorted({r["window"] for r in rows})
    print(f"\n{f.parent}: {len(wins)} windows, layers {sorted({r['layer'] for r in rows})}")
    print(f"{'method':>26} {'s':>5} {'recall':>7} {'density':>8} {'vs antidiagonal [95% CI]':>30}")
    for s in sorted({r["sparsity"] for r in rows}):
        for m in dict.fromkeys(r["method"] for r in rows):
            sub = [r for r in rows if r["method"] == m and r["sparsity"] == s]
            dens = sum(r["kept_blocks"] for r in sub) / max(1, sum(r["valid_blocks"] for r in sub))
            mean = method_means(rows, m, s, "recall")[0]
            d = paired(rows, m, "antidiagonal", s)
            print(f"{m:>26} {s:>5g} {mean:7.4f} {dens:8.4f} {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
EOF
tar czf "$OUT/recall-$MODEL.tgz" -C runs/gpu "recall-$MODEL"
cat "$OUT/steps.txt"
