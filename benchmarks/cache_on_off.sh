#!/usr/bin/env bash
# LayerNorm and bias+GELU, fwd+bwd, fusedformer vs torch, with fusedformer's CPU output cache on (the
# default cap, 256 MiB) and off (--cpu-cache-mb 0): how much of the lead is the cache. Each configuration
# is one interleaved run; the ratios are torch time / fusedformer time (BENCHMARKS.md's cache table).
#
#   benchmarks/cache_on_off.sh [OUT_DIR] [extra fusedformer-bench arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results/cache}
shift || true
PY=${PYTHON:-python}
ARGS=(--cases layer_norm,gelu --providers fusedformer,torch --modes fwd+bwd --no-memory --no-plots --no-progress
      --rows 8192 --widths 1024,4096 "$@")
"$PY" -m fusedformer.bench "${ARGS[@]}" --out "$OUT/on" >/dev/null
"$PY" -m fusedformer.bench "${ARGS[@]}" --cpu-cache-mb 0 --out "$OUT/off" >/dev/null
"$PY" - "$OUT" <<'PYEOF'
import csv, sys
from collections import defaultdict

out = sys.argv[1]
ratio = {}
for config in ("on", "off"):
    med = defaultdict(dict)
    for r in csv.DictReader(open(f"{out}/{config}/results.csv")):
        if r.get("status", "ok") != "ok":
            continue
        key = (r["case"], r.get("rows"), r.get("width"))
        med[key][r["provider"]] = float(r["median_ms"])
    for key, t in med.items():
        if "torch" in t and "fusedformer" in t:
            ratio[(key, config)] = t["torch"] / t["fusedformer"]
keys = sorted({k for k, _ in ratio})
print("| case | cache on (256 MiB) | cache off |")
print("| --- | --- | --- |")
for k in keys:
    print(f"| {k[0]} {k[1]}x{k[2]} | {ratio.get((k, 'on'), float('nan')):.2f}x | {ratio.get((k, 'off'), float('nan')):.2f}x |")
PYEOF
