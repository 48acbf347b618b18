"""The speed issue's targets, evaluated on a results.csv written by ``fusedformer-bench``.

    python -m fusedformer.bench.targets bench-results/results.csv    # prints a Markdown table

Each row names the measurement it reads; a target whose measurement is missing from the CSV (a case
not run, a fallback) is reported as such, never as met.
"""

from __future__ import annotations

import csv
import sys

__all__ = ["evaluate", "markdown"]


def _find(table, **want) -> dict | None:
    for r in table:
        if all(str(r.get(k, "")) == str(v) for k, v in want.items()):
            return r
    return None


def _attention(rows, L, causal, mode, provider="fusedformer"):
    return _find(rows, case="attention", provider=provider, mode=mode, L=L, causal=causal)


def evaluate(rows: list[dict]) -> list[dict]:
    """One dict per target: name, target, measured (a number or None), met, detail."""
    out = []

    def add(name, goal, cmp, value, detail):
        met = value is not None and (value >= goal if cmp == ">=" else value <= goal)
        out.append({"name": name, "target": f"{cmp} {goal:g}", "measured": value, "met": met, "detail": detail})

    def ratio_row(name, goal, r, field, detail):
        value = None
        if r is not None and r.get("fallback") != "True" and r.get(field):
            value = float(r[field])
        add(name, goal, ">=", value, detail if r is not None else "not measured")

    ratio_row("causal attention forward, L=4096, vs torch SDPA", 1.25,
              _attention(rows, 4096, True, "fwd"), "ratio_vs_torch", "torch time / fusedformer time")
    ratio_row("non-causal attention forward, L=4096, vs torch SDPA", 1.0,
              _attention(rows, 4096, False, "fwd"), "ratio_vs_torch", "torch time / fusedformer time")
    ratio_row("causal attention forward+backward, L=2048, vs torch SDPA", 1.3,
              _attention(rows, 2048, True, "fwd+bwd"), "ratio_vs_torch", "torch time / fusedformer time")
    for causal in (False, True):
        ratio_row(f"attention forward vs naive, L=4096 ({'causal' if causal else 'non-causal'})", 5.0,
                  _attention(rows, 4096, causal, "fwd"), "ratio_vs_naive", "naive time / fusedformer time")
    for causal in (False, True):
        r = _attention(rows, 4096, causal, "fwd")
        value = float(r["share_of_ceiling_pct"]) / 100 if r is not None and r.get("share_of_ceiling_pct") else None
        add(f"attention forward GFLOP/s vs fp32 GEMM GFLOP/s, L=4096 ({'causal' if causal else 'non-causal'})",
            0.65, ">=", value, f"{r['gflops']} GFLOP/s of GEMM {r['ceiling_rate']}" if r else "not measured")
    for mode in ("fwd", "fwd+bwd"):
        ff, naive = _attention(rows, 8192, False, mode), _attention(rows, 8192, False, mode, "naive")
        value = None
        if ff and naive and ff.get("peak_extra_mib") and naive.get("peak_extra_mib"):
            value = float(ff["peak_extra_mib"]) / float(naive["peak_extra_mib"])
        detail = (f"{ff['peak_extra_mib']} MiB vs {naive['peak_extra_mib']} MiB" if value is not None
                  else "not measured (memory probe off, or naive skipped)")
        add(f"peak extra memory of attention {mode}, L=8192, vs naive", 0.01, "<=", value, detail)
    ratio_row("LayerNorm forward+backward, (8192, 1024), vs F.layer_norm", 1.2,
              _find(rows, case="layer_norm", provider="fusedformer", mode="fwd+bwd", rows=8192, width=1024),
              "ratio_vs_torch", "torch time / fusedformer time")
    ratio_row("bias+GELU forward+backward, (8192, 4096), vs F.gelu(x + b)", 1.8,
              _find(rows, case="gelu", provider="fusedformer", mode="fwd+bwd", rows=8192, width=4096),
              "ratio_vs_torch", "torch time / fusedformer time")
    enc = _find(rows, case="encoder", provider="fusedformer", mode="fwd+bwd")
    ratio_row("encoder layer forward+backward (d=512, 8 heads, L=1024, batch 8, dropout 0.1) vs "
              "nn.TransformerEncoderLayer", 1.2, enc, "ratio_vs_torch", "torch time / fusedformer time")
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| target | goal | measured | met |", "| --- | --- | --- | --- |"]
    for t in results:
        m = "not measured" if t["measured"] is None else f"{t['measured']:.3g} ({t['detail']})"
        lines.append(f"| {t['name']} | {t['target']} | {m} | {'**met**' if t['met'] else '**not met**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "bench-results/results.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    print(markdown(evaluate(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
