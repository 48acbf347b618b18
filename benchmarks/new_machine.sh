#!/usr/bin/env bash
# Everything a new machine's section of BENCHMARKS.md is built from, in one go: the full benchmark run and
# its targets table (issue 8's and the others'), then the model-level side-by-side scripts (real MiniLM in
# fp32 and bf16, its small calls and training step, GPT-2 generation and training). Each step's output is
# kept in OUT_DIR (default benchmarks/results/<cpu model>-f<family>m<model>), with lscpu's, beside the
# bench's CSV, report and plots. About 25-35 minutes on 2 cores; `make setup` first (or PYTHON=...).
#
#   benchmarks/new_machine.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
FAMILY=$(lscpu | sed -n 's/^CPU family: *//p' | head -1)
NUMBER=$(lscpu | sed -n 's/^Model: *//p' | head -1)
SLUG=$(echo "${MODEL:-cpu} f${FAMILY}m${NUMBER}" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
OUT=${1:-benchmarks/results/$SLUG}
mkdir -p "$OUT"
lscpu > "$OUT/lscpu.txt"
step() {  # step NAME COMMAND...: runs it, its output to OUT/NAME.txt and the terminal
  local name=$1
  shift
  echo "== $name: $*" | tee "$OUT/$name.txt"
  "$@" 2>&1 | sed '/^Loading weights/d' | tee -a "$OUT/$name.txt"
}
step bench "$PY" -m fusedformer.bench --out "$OUT" --markdown "$OUT/page.md" --no-progress
step targets "$PY" -m fusedformer.bench.targets "$OUT/results.csv"
step minilm-fp32 "$PY" examples/patch_minilm.py --tokens 122
step minilm-bf16 "$PY" examples/patch_minilm.py --tokens 122 --dtype bfloat16
step minilm-small "$PY" -m benchmarks.minilm_small --calls 300
step minilm-train "$PY" -m benchmarks.train_step
step gpt2-generate "$PY" benchmarks/generate.py --repeats 3
step gpt2-train "$PY" -m benchmarks.train_step --model gpt2
echo "wrote $OUT"
