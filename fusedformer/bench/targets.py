"""The speed issue's targets, evaluated on a results.csv written by ``fusedformer-bench``.

    python -m fusedformer.bench.targets bench-results/results.csv    # prints a Markdown table

Each row names the measurement it reads; a target whose measurement is missing from the CSV (a case
not run, a fallback) is reported as such, never as met. Every lookup is by dtype too (float32 unless a
target says otherwise) and by the target's shape (attention's B=1, H=8, E=64; the encoder layer's
d=512, 8 heads, L=1024, batch 8), so a bfloat16 row, or a ``--quick`` run's smaller shape, never
answers for a float32 target at the issue's shape.
"""

from __future__ import annotations

import csv
import sys

__all__ = ["evaluate", "markdown"]

_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _find(table: list[dict], dtype: str = "float32", **want) -> dict | None:
    """The first row of ``table`` in ``dtype`` whose every ``want`` field reads the same (as text)."""
    want["dtype"] = dtype
    for r in table:
        if all(str(r.get(k, "")) == str(v) for k, v in want.items()):
            return r
    return None


def _attention(
    rows: list[dict], L: int, causal: bool, mode: str, dtype: str = "float32", provider: str = "fusedformer"
) -> dict | None:
    """The attention row at the issue's shape (B=1, H=8, E=64, S=L)."""
    return _find(rows, dtype, case="attention", provider=provider, mode=mode, B=1, H=8, E=64, L=L, S=L,
                 causal=causal)  # fmt: skip


def _fused(r: dict | None, field: str) -> float | None:
    """``r[field]`` as a number, or None when the row is missing, is a fallback or has no such value."""
    if r is None or str(r.get("fallback")) == "True" or r.get(field) in (None, ""):
        return None
    return float(r[field])


def evaluate(rows: list[dict]) -> list[dict]:
    """One dict per target: name, target, measured (a number or None), met, detail."""
    out = []

    def add(name, goal, cmp, value, detail):
        met = value is not None and (value >= goal if cmp == ">=" else value <= goal)
        out.append({"name": name, "target": f"{cmp} {goal:g}", "measured": value, "met": met, "detail": detail})

    def ratio_row(name, goal, r, field, detail):
        add(name, goal, ">=", _fused(r, field), detail if r is not None else "not measured")

    vs_torch = "torch time / fusedformer time"
    for dtype in ("float32", "bfloat16"):
        short = _SHORT[dtype]
        ratio_row(f"{short} causal attention forward, L=4096, vs torch SDPA", 1.25,
                  _attention(rows, 4096, True, "fwd", dtype), "ratio_vs_torch", vs_torch)
        ratio_row(f"{short} non-causal attention forward, L=4096, vs torch SDPA", 1.1,
                  _attention(rows, 4096, False, "fwd", dtype), "ratio_vs_torch", vs_torch)
        ratio_row(f"{short} causal attention forward+backward, L=2048, vs torch SDPA", 1.3,
                  _attention(rows, 2048, True, "fwd+bwd", dtype), "ratio_vs_torch", vs_torch)
    for causal in (False, True):
        ratio_row(f"fp32 attention forward vs naive, L=4096 ({'causal' if causal else 'non-causal'})", 5.0,
                  _attention(rows, 4096, causal, "fwd"), "ratio_vs_naive", "naive time / fusedformer time")
    # share of torch.mm's rate in the row's own dtype (the CSV's share_of_ceiling_pct)
    for dtype, causal, goal in (("float32", False, 0.75), ("float32", True, 0.65), ("bfloat16", False, 0.5)):
        r = _attention(rows, 4096, causal, "fwd", dtype)
        pct = _fused(r, "share_of_ceiling_pct")
        short = _SHORT[dtype]
        detail = f"{r['gflops']} GFLOP/s of {short} GEMM {r['ceiling_rate']}" if pct is not None else ""
        add(f"{short} attention forward GFLOP/s vs {short} GEMM GFLOP/s, L=4096 "
            f"({'causal' if causal else 'non-causal'})", goal, ">=", pct / 100 if pct is not None else None,
            detail)  # fmt: skip
    for mode in ("fwd", "fwd+bwd"):
        ff, naive = _attention(rows, 8192, False, mode), _attention(rows, 8192, False, mode, provider="naive")
        value = None
        if ff and naive and ff.get("peak_extra_mib") and naive.get("peak_extra_mib"):
            value = float(ff["peak_extra_mib"]) / float(naive["peak_extra_mib"])
        detail = (f"{ff['peak_extra_mib']} MiB vs {naive['peak_extra_mib']} MiB" if value is not None
                  else "not measured (memory probe off, or naive skipped)")
        add(f"peak extra memory of fp32 attention {mode}, L=8192, vs naive", 0.01, "<=", value, detail)
    # issue 9: decode attention, B=4, H=12, one query, S=4096, E=64, fp32: vs torch, and vs the read ceiling
    # (the decode case's own "read" provider: torch reading the same K and V once, ff/read = its share)
    dec = _find(rows, case="decode", provider="fusedformer", mode="fwd", B=4, H=12, L=1, S=4096, E=64)
    ratio_row("fp32 decode attention (B=4, H=12, S=4096, E=64) vs torch SDPA", 1.0, dec, "ratio_vs_torch", vs_torch)
    ratio_row("fp32 decode attention (B=4, H=12, S=4096, E=64) vs reading K and V once", 0.85, dec, "ratio_vs_read",
              "read time / fusedformer time: the share of the read-bandwidth ceiling")
    ratio_row("fp32 LayerNorm forward+backward, (8192, 1024), vs F.layer_norm", 1.2,
              _find(rows, case="layer_norm", provider="fusedformer", mode="fwd+bwd", rows=8192, width=1024),
              "ratio_vs_torch", vs_torch)
    ratio_row("fp32 RMSNorm forward+backward, (8192, 4096), vs F.rms_norm", 1.5,
              _find(rows, case="rms_norm", provider="fusedformer", mode="fwd+bwd", rows=8192, width=4096),
              "ratio_vs_torch", vs_torch)
    ratio_row("fp32 residual add + LayerNorm forward+backward, (8192, 4096), vs x + r then F.layer_norm", 1.3,
              _find(rows, case="add_layer_norm", provider="fusedformer", mode="fwd+bwd", rows=8192, width=4096),
              "ratio_vs_torch", vs_torch)
    ratio_row("fp32 bias+GELU forward+backward, (8192, 4096), vs F.gelu(x + b)", 1.8,
              _find(rows, case="gelu", provider="fusedformer", mode="fwd+bwd", rows=8192, width=4096),
              "ratio_vs_torch", vs_torch)
    enc = _find(rows, case="encoder", provider="fusedformer", mode="fwd+bwd", d_model=512, nhead=8,
                length=1024, batch=8, dropout=0.1)  # fmt: skip
    ratio_row("fp32 encoder layer forward+backward (d=512, 8 heads, L=1024, batch 8, dropout 0.1) vs "
              "nn.TransformerEncoderLayer", 1.2, enc, "ratio_vs_torch", vs_torch)
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
