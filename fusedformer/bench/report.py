"""The run's outputs: a plain-text table (stdout), a CSV (one row per case shape, dtype, mode and
provider, each row carrying the machine, date, version and commit) and a Markdown page with the plots.

The header names the machine: the CPU's model, its AMX / AVX512-BF16 / AVX512-FP16 features, on CPU
runs the product engine fusedformer's attention uses per dtype (when the package can say), and every
ceiling with its dtype. Each case has a section per dtype (attention runs at several in one run).

Reading the table:

- time: the median milliseconds of one call, ``±`` half the interquartile range in percent of it;
  the providers ran interleaved, each repeat in a rotated order, warm-up excluded. ``fwd`` runs under
  ``no_grad``; ``fwd+bwd`` is forward and backward timed as one unit; ``bwd`` is the backward alone,
  timed inside those same calls from the end of the forward (a fresh graph each call).
- speed-up ``ff/torch``: torch's median / fusedformer's median, so above 1 means fusedformer is
  faster (likewise ``ff/naive``). In the CSV, ``ratio_vs_torch`` is that ratio for every provider.
- throughput: GFLOP/s for attention (FlashAttention's count, 4·B·H·L·S·E, halved when causal, ×2.5
  for the backward) and for layers (their matmuls and attention); GB/s for LayerNorm and GELU (the
  least traffic: 2 tensors forward, 3 backward); in brackets, the share of the machine's ceiling:
  for GFLOP/s the GEMM ceiling of the section's own dtype, for GB/s the copy ceiling.
- memory: peak extra MiB of one call over its inputs, measured in a fresh process (``VmHWM``).
- ``†``: fusedformer ran on the reference path there (a fallback), so that cell is not a fused
  result; the footnote gives ``ff.explain``'s reasons.

CSV columns beyond the table's (one name per line in ``CSV_COLUMNS``):

- ``machine``: CPU model, family and model numbers, CPUs, widest SIMD, memory; ``cpu_features``: which
  of amx_tile, amx_bf16, amx_fp16, avx512_bf16, avx512_fp16 ``/proc/cpuinfo`` lists, space-separated
  ("none": none of them; "unknown": no ``/proc/cpuinfo``).
- ``dtype``: the dtype the row ran in; ``backend``: what served the provider (``(FALLBACK)`` for
  fusedformer on the reference path); ``matmul_engine``: on fusedformer's attention rows of a CPU
  run, the engine its tile products ran on for that dtype (``fusedformer.backends.cpu_matmul_engines``;
  empty where the package does not say, and on fallbacks).
- ``gflops`` / ``gbps``: the rate; ``ceiling``: which ceiling bounds it (``GEMM``: ``torch.mm`` in
  the row's own dtype; ``copy``: a large tensor copy); ``ceiling_rate``: that ceiling in the rate's
  unit; ``share_of_ceiling_pct``: 100 · rate / ceiling_rate.
- ``ratio_vs_torch`` / ``ratio_vs_naive`` (/ ``ratio_vs_torch-loop``, varlen rows; / ``ratio_vs_read``,
  decode rows: the time to read K and V once, so fusedformer's is its share of that ceiling): the other provider's
  median / this row's median, at the same shape, dtype and mode.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fusedformer.bench.cases import ALL_PROVIDERS, PROVIDERS, ROW_CASES
from fusedformer.bench.machine import features_text

__all__ = ["CSV_COLUMNS", "format_report", "write_csv", "write_markdown"]

CSV_COLUMNS = [
    "machine", "cpu_features", "device", "threads", "date", "version", "commit", "torch_version", "load_avg",
    "case", "shape", "provider", "mode", "dtype",
    "B", "H", "L", "S", "E", "causal", "lengths",
    "rows", "width", "approximate",
    "batch", "length", "d_model", "nhead", "dim_feedforward", "dropout", "activation",
    "backend", "matmul_engine", "fallback", "status", "repeats", "calls_per_sample",
    "median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "spread_pct",
    "gflops", "gbps", "ceiling", "ceiling_rate", "share_of_ceiling_pct",
    "ratio_vs_torch", "ratio_vs_naive", "ratio_vs_torch-loop", "ratio_vs_read",
    "peak_extra_mib", "memory_status",
]  # fmt: skip

_FALLBACK_MARK = "†"


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    if v is None:
        return ""
    return v


def write_csv(rows: Iterable[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})


# ---- the text table -------------------------------------------------------------------------------


def _num(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    if a >= 1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def _status_cell(row: dict[str, Any] | None) -> str | None:
    """The short cell for a row that has no measurement, or None when it has one."""
    if row is None:
        return ""
    status = str(row.get("status", ""))
    if status == "ok":
        return None
    if status.startswith("skipped"):
        return "skipped*"
    if status.startswith("unavailable"):
        return "unavailable*"
    return "error*"


def _mark(row: dict[str, Any]) -> str:
    return f" {_FALLBACK_MARK}" if row.get("fallback") else ""


def _time_cell(row: dict[str, Any] | None) -> str:
    short = _status_cell(row)
    if short is not None:
        return short
    assert row is not None
    return f"{_num(row['median_ms'])} ±{row['spread_pct']:.0f}%{_mark(row)}"


def _rate_cell(row: dict[str, Any] | None) -> str:
    short = _status_cell(row)
    if short is not None:
        return short
    assert row is not None
    rate = row.get("gflops") if row.get("gflops") is not None else row.get("gbps")
    return f"{_num(rate)} ({row['share_of_ceiling_pct']:.0f}%){_mark(row)}"


def _mem_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row.get("peak_extra_mib") is not None:
        return f"{row['peak_extra_mib']:.1f}{_mark(row)}"
    status = str(row.get("memory_status") or "")
    if status.startswith("skipped"):
        return "skipped*"
    if status.startswith(("error", "n/a", "unavailable")):
        return "n/a*"
    return "-"


def _ratio_cell(row: dict[str, Any] | None, other: str) -> str:
    if row is None or row.get(f"ratio_vs_{other}") is None:
        return "-"
    return f"{row[f'ratio_vs_{other}']:.2f}x{_mark(row)}"


def format_table(headers: list[str], body: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in body)])


def _groups(
    rows: list[dict[str, Any]], case: str, dtype: str
) -> list[tuple[list[str], str, dict[str, dict]]]:
    """[(key cells, mode, {provider: row})] in run order, for one case at one dtype."""
    out: dict[tuple, tuple[list[str], str, dict[str, dict]]] = {}
    for r in rows:
        if r["case"] != case or r["dtype"] != dtype:
            continue
        if case == "attention":
            key_cells = ["causal" if r["causal"] else "full", str(r["L"])]
        else:
            key_cells = [r["shape"]]
        key = (*key_cells, r["mode"])
        out.setdefault(key, (key_cells, r["mode"], {}))[2][r["provider"]] = r
    return list(out.values())


_TITLES = {
    "attention": "attention (scaled dot-product)",
    "decode": "decode attention (one query against a long key range)",
    "layer_norm": "LayerNorm (with weight and bias)",
    "rms_norm": "RMSNorm (with weight)",
    "add_layer_norm": "residual add + LayerNorm (x + r, then LayerNorm with weight and bias)",
    "add_rms_norm": "residual add + RMSNorm (x + r, then RMSNorm with weight)",
    "gelu": "bias + GELU",
    "linear": "linear layer (x W^T + b; fusedformer: oneDNN brgemm, torch: MKL sgemm)",
    "encoder": "TransformerEncoderLayer (train mode, batch_first)",
    "decoder": "TransformerDecoderLayer (train mode, causal self-attention, batch_first)",
    "varlen": "varlen attention (packed sequences; torch: SDPA on the padded batch; torch-loop: SDPA per sequence)",
}


def _case_section(result: Any, case: str, dtype: str) -> str:
    rows = [r for r in result.rows if r["case"] == case and r["dtype"] == dtype]
    if not rows:
        return ""
    providers = [p for p in ALL_PROVIDERS if any(r["provider"] == p for r in rows)]
    c = result.ceilings
    first = rows[0]
    gemm_unit = f"GFLOP/s (% of {dtype} GEMM {c.gemm_gflops(dtype):.0f})"
    if case == "attention":
        key_headers = ["mask", "L"]
        detail = f"B={first['B']} H={first['H']} E={first['E']} S=L {dtype}"
        engine = result.info.matmul_engines.get(dtype)
        if engine:
            detail += f", fusedformer's products on {engine}"
        rate_unit = gemm_unit
    elif case == "decode":
        key_headers = ["shape"]
        detail = f"E={first['E']} {dtype}, one query per sequence: bound by reading K and V"
        rate_unit = f"GB/s (% of copy {c.copy_gbps:.0f})"
    elif case in ROW_CASES:
        key_headers = ["rows x width"]
        detail = dtype + (f" approximate={first.get('approximate')}" if case == "gelu" else "")
        rate_unit = f"GB/s (% of copy {c.copy_gbps:.0f})"
    elif case == "linear":
        key_headers = ["rows x in -> out"]
        detail = dtype + (" (computed in float32)" if dtype == "float16" else "")
        rate_unit = gemm_unit
    else:
        key_headers = ["shape"]
        detail = f"{dtype} activation={first.get('activation')}"
        rate_unit = gemm_unit
    groups = _groups(result.rows, case, dtype)
    others = [o for o in ("torch", "naive", "torch-loop", "read") if o in providers] if "fusedformer" in providers else []

    headers = [*key_headers, "mode", *[f"{p} ms" for p in providers], *[f"ff/{o}" for o in others]]
    body = []
    for key_cells, mode, by_p in groups:
        cells = [*key_cells, mode, *[_time_cell(by_p.get(p)) for p in providers]]
        cells += [_ratio_cell(by_p.get("fusedformer"), o) for o in others]
        body.append(cells)
    right = set(range(len(key_headers) + 1, len(headers)))
    time_table = format_table(headers, body, right)

    headers2 = [*key_headers, "mode", *providers, *[f"MiB {p}" for p in providers]]
    body2 = []
    for key_cells, mode, by_p in groups:
        body2.append(
            [
                *key_cells,
                mode,
                *[_rate_cell(by_p.get(p)) for p in providers],
                *[_mem_cell(by_p.get(p)) for p in providers],
            ]
        )
    right2 = set(range(len(key_headers) + 1, len(headers2)))
    rate_table = format_table(headers2, body2, right2)

    lines = [f"== {_TITLES.get(case, case)}: {detail} =="]
    lines.append(
        "time per call, median ms ±half-IQR; ff/X = X's time / fusedformer's (>1: fusedformer is faster)"
    )
    lines.append(time_table)
    lines.append("")
    lines.append(f"throughput {rate_unit}; MiB = peak extra memory of one call, in a fresh process")
    lines.append(rate_table)
    return "\n".join(lines)


def _footnotes(result: Any) -> list[str]:
    notes = []
    reasons: dict[str, list[str]] = {}
    for label, why in result.fallbacks.items():
        reasons.setdefault(why, []).append(label)
    for why, labels in reasons.items():
        where = labels[0] if len(labels) == 1 else f"{labels[0]} and {len(labels) - 1} more"
        notes.append(
            f"{_FALLBACK_MARK} fusedformer fell back to the reference path (NOT a fused result) for {where}: {why}"
        )
    seen: set[str] = set()
    for r in result.rows:
        for key in ("status", "memory_status"):
            status = str(r.get(key) or "")
            if (
                status
                and not status.startswith("ok")
                and not (key == "memory_status" and status == r.get("status"))
            ):
                text = f"* {r['case']} {r['dtype']} {r['shape']} {r['mode']} {r['provider']}: {status}"
                if text not in seen:
                    seen.add(text)
                    notes.append(text)
    return notes


def format_report(result: Any) -> str:
    """The whole text report: header (machine, ceilings), one section per case and dtype, footnotes."""
    info, c, cfg = result.info, result.ceilings, result.config
    lines = [
        cfg.command or f"fusedformer-bench{' --quick' if cfg.quick else ''}",
        info.header(),
        "ceilings (the better of start and end of the run; GFLOP/s shares are of their own dtype's GEMM):",
        *(f"  {line}" for line in c.describe()),
        "modes: fwd = forward under no_grad; fwd+bwd = forward and backward timed as one unit; bwd = the backward"
        " alone, timed inside those same calls from the end of the forward",
    ]
    if any(r.get("fallback") for r in result.rows):
        lines.append(
            f"NOTE: cells marked {_FALLBACK_MARK} ran on fusedformer's reference path (a fallback), not a fused kernel"
        )
    if cfg.memory and not cfg.memory_all_sizes:
        lines.append(
            "memory measured at the largest size of each case only ('-' elsewhere; --memory-all-sizes)"
        )
    elif not cfg.memory:
        lines.append("memory not measured (--no-memory)")
    for case, dtype in dict.fromkeys((r["case"], r["dtype"]) for r in result.rows):
        lines += ["", _case_section(result, case, dtype)]
    notes = _footnotes(result)
    if notes:
        lines += ["", *notes]
    lines += ["", f"wall time {result.seconds:.0f} s"]
    return "\n".join(lines)


def write_markdown(result: Any, text: str, plots: list[Path], path: Path, command: str) -> None:
    """A page (BENCHMARKS.md) with the command, the text report and the plots, linked relatively."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# fusedformer benchmarks",
        "",
        f"Measured on **{result.info.machine}** ({result.info.device}, {result.info.threads} torch threads), "
        f"{result.info.date}, fusedformer {result.info.version} at commit `{result.info.commit}`, "
        f"torch {result.info.torch}. CPU features: {features_text(result.info.cpu_features)}.",
        "",
        "Reproduce with:",
        "",
        "```sh",
        command,
        "```",
        "",
        "How to read it: times are medians of interleaved repeats (warm-up excluded) with ± half the",
        "interquartile range; `ff/torch` is torch's time over fusedformer's (above 1, fusedformer is faster);",
        "throughput is GFLOP/s for attention (FlashAttention's count) and GB/s for LayerNorm and GELU, with",
        "the share of this machine's own measured ceilings (GFLOP/s of `torch.mm` in the section's own",
        "dtype, GB/s of a large copy); MiB is the peak extra memory of one call, measured in a fresh",
        f"process. A `{_FALLBACK_MARK}` marks a fusedformer cell that ran on the reference path (a",
        "fallback), which is not a fused result.",
        "",
        "```text",
        text,
        "```",
        "",
    ]
    for p in plots:
        rel = os.path.relpath(p, path.parent)
        lines += [f"![{p.stem}]({rel})", ""]
    path.write_text("\n".join(lines))
