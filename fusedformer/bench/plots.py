"""PNG plots (matplotlib, Agg backend) of a run.

One pair of attention figures per dtype the run measured attention in (``<dtype>``: float32,
bfloat16, ...), each titled with it:

- ``attention_time_<dtype>.png``: time per call against sequence length, log-log, one panel per mode
  and mask. Naive attention's O(L²) slope shows as a straight line of slope 2 (a dotted L² guide is
  drawn through its first point); its memory wall (where the machine can no longer hold its (L, S)
  scores) is drawn as a vertical line, and lengths it was skipped at are marked.
- ``attention_memory_<dtype>.png``: peak extra memory of one call against sequence length, log-log,
  with the machine's memory as a horizontal line: naive's O(L²) scores climb into it, the fused O(L)
  stay low.
- ``rows_throughput.png``: LayerNorm and bias+GELU GB/s per shape, with the copy-bandwidth ceiling
  (in the run's ``--dtype``).

Every figure names the machine (with its AMX / AVX512-BF16 / AVX512-FP16 flags), the date and the
commit. A fusedformer line that ran on the reference path (a fallback) is drawn dashed and labelled
as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusedformer.bench.cases import PROVIDERS, ROW_CASES, AttentionCase, Spec

__all__ = ["make_plots"]

_COLORS = {"fusedformer": "tab:blue", "torch": "tab:orange", "naive": "tab:red"}
_MARKERS = {"fusedformer": "o", "torch": "s", "naive": "^"}
_GIB = 2**30


def _footer(fig: Any, result: Any) -> float:
    """Write the machine (with its CPU features) and the run's versions under ``fig``, in two grey
    lines; returns the share of the figure's height they take, the bottom of ``tight_layout``'s rect."""
    i = result.info
    text = (
        f"{i.machine} | cpu features: {i.features_csv} | {i.device}, {i.threads} threads\n"
        f"fusedformer {i.version} @ {i.commit} | torch {i.torch} | {i.date}"
    )
    fig.text(0.5, 0.005, text, ha="center", va="bottom", fontsize=7, color="grey")
    return 0.3 / fig.get_figheight()  # two 7-point lines and a gap, in inches


def _label(provider: str, rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(legend label, line style): fallbacks are dashed and say so."""
    if provider == "fusedformer" and any(r.get("fallback") for r in rows):
        backends = sorted({str(r.get("backend", "")).split(" ")[0] for r in rows if r.get("fallback")})
        return f"fusedformer (FALLBACK: {', '.join(backends)} path)", "--"
    return provider, "-"


def naive_memory_wall(first_row: dict[str, Any], mode: str, total: int) -> int | None:
    """The smallest L (self-attention, L = S) whose naive call would need more than ``total`` bytes."""
    base = {k: first_row[k] for k in ("B", "H", "E")}

    def need(L: int) -> int:
        spec = Spec(
            "attention",
            {**base, "L": L, "S": L, "causal": bool(first_row["causal"])},
            "cpu",
            first_row["dtype"],
        )
        return AttentionCase(spec).estimate_bytes("naive", mode)

    lo, hi = 1, 1
    while need(hi) <= total:
        hi *= 2
        if hi > 2**24:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= total else (lo, mid)
    return hi


def _attention_panels(rows: list[dict[str, Any]]) -> tuple[list[str], list[bool]]:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    masks = list(dict.fromkeys(bool(r["causal"]) for r in rows))
    return modes, masks


def _attention_time(result: Any, rows: list[dict[str, Any]], out: Path, plt: Any, total: int | None) -> Path:
    modes, masks = _attention_panels(rows)
    fig, axes = plt.subplots(
        len(modes), len(masks), figsize=(5.2 * len(masks), 3.6 * len(modes)), squeeze=False, sharex=True
    )
    for i, mode in enumerate(modes):
        for j, causal in enumerate(masks):
            ax = axes[i][j]
            panel = [r for r in rows if r["mode"] == mode and bool(r["causal"]) == causal]
            lengths = sorted({int(r["L"]) for r in panel})
            for p in PROVIDERS:
                mine = [r for r in panel if r["provider"] == p]
                ok = sorted((int(r["L"]), r) for r in mine if r.get("status") == "ok")
                if not ok:
                    continue
                label, style = _label(p, [r for _, r in ok])
                xs = [L for L, _ in ok]
                ys = [r["median_ms"] for _, r in ok]
                lo = [r["median_ms"] - r["q1_ms"] for _, r in ok]
                hi = [r["q3_ms"] - r["median_ms"] for _, r in ok]
                ax.errorbar(xs, ys, yerr=[lo, hi], label=label, color=_COLORS[p], marker=_MARKERS[p],
                            linestyle=style, capsize=2, markersize=4)  # fmt: skip
                if p == "naive" and len(xs) >= 1:
                    guide = [ys[0] * (L / xs[0]) ** 2 for L in lengths]
                    ax.plot(lengths, guide, ":", color="grey", linewidth=1, label="∝ L² (through naive)")
                skipped = [int(r["L"]) for r in mine if str(r.get("status", "")).startswith("skipped")]
                for L in skipped:
                    ax.axvline(L, color=_COLORS[p], alpha=0.25, linewidth=6)
                if skipped:
                    ax.text(skipped[0], ax.get_ylim()[1], f" {p} skipped:\n out of memory", color=_COLORS[p],
                            va="top", fontsize=7)  # fmt: skip
            if total and panel:
                wall = naive_memory_wall(panel[0], mode, total)
                if wall and lengths and wall <= 2 * max(lengths):
                    ax.axvline(wall, color=_COLORS["naive"], linestyle="-.", linewidth=1,
                               label=f"naive memory wall ≈ L={wall}")  # fmt: skip
                elif wall:
                    ax.plot([], [], " ", label=f"naive memory wall ≈ L={wall} (off the axis)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{mode}, {'causal' if causal else 'full'}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(modes) - 1:
                ax.set_xlabel("sequence length L (= S)")
            if j == 0:
                ax.set_ylabel("ms per call (median, IQR bars)")
            ax.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(
        f"attention: time vs sequence length (B={first['B']}, H={first['H']}, E={first['E']}, {first['dtype']})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, _footer(fig, result), 1, 0.97))
    path = out / f"attention_time_{first['dtype']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _attention_memory(
    result: Any, rows: list[dict[str, Any]], out: Path, plt: Any, total: int | None
) -> Path | None:
    measured = [r for r in rows if r.get("peak_extra_mib") is not None]
    if not measured:
        return None
    modes = list(dict.fromkeys(r["mode"] for r in measured))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.0), squeeze=False)
    for j, mode in enumerate(modes):
        ax = axes[0][j]
        panel = [r for r in rows if r["mode"] == mode]
        for p in PROVIDERS:
            for causal in (False, True):
                mine = sorted(
                    (int(r["L"]), r)
                    for r in panel
                    if r["provider"] == p
                    and bool(r["causal"]) == causal
                    and r.get("peak_extra_mib") is not None
                )
                if not mine:
                    continue
                label, style = _label(p, [r for _, r in mine])
                style = ":" if causal and style == "-" else style
                ax.plot([L for L, _ in mine], [max(r["peak_extra_mib"], 1e-2) for _, r in mine],
                        marker=_MARKERS[p], color=_COLORS[p], linestyle=style, markersize=5 if causal else 4,
                        markerfacecolor="none" if causal else _COLORS[p],
                        label=f"{label}{', causal (hollow)' if causal else ''}")  # fmt: skip
        if total:
            ax.axhline(
                total / 2**20, color="black", linewidth=1, label=f"machine memory {total / _GIB:.0f} GiB"
            )
            wall = naive_memory_wall(panel[0], mode, total) if panel else None
            lengths = [int(r["L"]) for r in panel]
            if wall and lengths:
                # the estimate the skip decision uses, from the largest measured length up to the wall
                xs = [L for L in (2**k for k in range(4, 25)) if max(lengths) <= L <= wall] + [wall]
                first = panel[0]
                ys = []
                for L in xs:
                    spec = Spec("attention", {**{k: first[k] for k in ("B", "H", "E")}, "L": L, "S": L,
                                              "causal": False}, "cpu", first["dtype"])  # fmt: skip
                    ys.append(AttentionCase(spec).estimate_bytes("naive", mode) / 2**20)
                ax.plot(xs, ys, "--", color=_COLORS["naive"], alpha=0.5, linewidth=1,
                        label=f"naive, estimated need (the skip rule); wall ≈ L={wall}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{mode}: peak extra memory of one call", fontsize=10)
        ax.set_xlabel("sequence length L (= S)")
        ax.set_ylabel("MiB over the inputs (VmHWM, fresh process)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"attention: memory vs sequence length ({rows[0]['dtype']})", fontsize=11)
    fig.tight_layout(rect=(0, _footer(fig, result), 1, 0.95))
    path = out / f"attention_memory_{rows[0]['dtype']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rows_throughput(result: Any, out: Path, plt: Any) -> Path | None:
    cases = [c for c in ROW_CASES if any(r["case"] == c and r.get("gbps") for r in result.rows)]
    if not cases:
        return None
    modes = list(dict.fromkeys(r["mode"] for r in result.rows if r["case"] in cases))
    fig, axes = plt.subplots(
        len(cases), len(modes), figsize=(4.6 * len(modes), 3.4 * len(cases)), squeeze=False
    )
    for i, case in enumerate(cases):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            panel = [r for r in result.rows if r["case"] == case and r["mode"] == mode]
            shapes = list(dict.fromkeys(r["shape"] for r in panel))
            width = 0.8 / len(PROVIDERS)
            for k, p in enumerate(PROVIDERS):
                vals = []
                for s in shapes:
                    r = next((r for r in panel if r["shape"] == s and r["provider"] == p), None)
                    vals.append(r["gbps"] if r is not None and r.get("gbps") else 0.0)
                label, style = _label(p, [r for r in panel if r["provider"] == p])
                ax.bar([x + (k - 1) * width for x in range(len(shapes))], vals, width, color=_COLORS[p],
                       label=label, hatch="//" if style == "--" else None)  # fmt: skip
            ax.axhline(result.ceilings.copy_gbps, color="black", linewidth=1,
                       label=f"copy ceiling {result.ceilings.copy_gbps:.0f} GB/s")  # fmt: skip
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, fontsize=7, rotation=20)
            ax.set_title(f"{case} {mode}", fontsize=10)
            ax.set_ylabel("GB/s")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=6)
    dtypes = ", ".join(dict.fromkeys(r["dtype"] for r in result.rows if r["case"] in cases))
    fig.suptitle(f"LayerNorm and bias+GELU: achieved bandwidth (rows x width, {dtypes})", fontsize=11)
    fig.tight_layout(rect=(0, _footer(fig, result), 1, 0.95))
    path = out / "rows_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(result: Any, out: Path, total_memory: int | None) -> list[Path]:
    """Write the PNGs into ``out``; returns their paths (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path | None] = []
    attention = [r for r in result.rows if r["case"] == "attention"]
    for dtype in dict.fromkeys(r["dtype"] for r in attention):
        rows = [r for r in attention if r["dtype"] == dtype]
        if any(r.get("status") == "ok" for r in rows):
            paths.append(_attention_time(result, rows, out, plt, total_memory))
            paths.append(_attention_memory(result, rows, out, plt, total_memory))
    paths.append(_rows_throughput(result, out, plt))
    return [p for p in paths if p is not None]
