"""One benchmark run: which cases at which sizes (``Config``), and the loop that measures them into rows.

A row is one (case shape, dtype, mode, provider): its time statistics, throughput, the backend that
served it, its ratios to torch and naive, and its peak extra memory. Attention runs at each of
``Config.attention_dtypes`` in the same run (float32, bfloat16 and float16 by default), everything
else at ``Config.dtype``. ``run(config)`` returns the rows and the ceilings (a GEMM ceiling per dtype
measured); ``report`` and ``plots`` turn them into the table, the CSV and the PNGs.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import fusedformer as ff
from fusedformer.bench import memory
from fusedformer.bench.cases import (
    ALL_PROVIDERS,
    CASES,
    ROW_CASES,
    MODES,
    Case,
    Spec,
    flop_or_byte_rate,
    make_case,
    train_unit,
    unit,
    varlen_lengths,
)
from fusedformer.bench.ceilings import Ceilings, best_of, measure_ceilings
from fusedformer.bench.machine import RunInfo, run_info
from fusedformer.bench.timing import Stats, TimingConfig, measure

__all__ = ["Config", "Result", "default_config", "run", "skip_reason", "specs"]

_GIB = 2**30
# a call is skipped when its estimated memory exceeds this share of what the machine has free (less
# a fixed reserve): the rest of the process and the other providers' inputs need room too
_MEMORY_SHARE, _MEMORY_RESERVE = 0.85, _GIB // 2
_16BIT = ("bfloat16", "float16")  # attention at these dtypes runs at Config.lengths_16bit


@dataclasses.dataclass
class Config:
    device: str = "cpu"
    dtype: str = "float32"  # LayerNorm, GELU and the layers; attention runs at attention_dtypes
    cases: tuple[str, ...] = CASES
    providers: tuple[str, ...] = ALL_PROVIDERS
    modes: tuple[str, ...] = MODES
    layer_modes: tuple[str, ...] = ("fwd+bwd",)
    # attention
    attention_dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)  # at float32 and float64
    # at bfloat16 and float16: fewer, to keep the run short, but with the targets' L=2048 and L=4096
    lengths_16bit: tuple[int, ...] = (512, 1024, 2048, 4096)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    causal: tuple[bool, ...] = (False, True)
    # decode: one query per sequence against S keys, forward only, at attention_dtypes' first two
    decode_lengths: tuple[int, ...] = (1024, 4096, 16384)
    decode_batch: int = 4
    decode_heads: int = 12
    # LayerNorm and GELU
    rows: tuple[int, ...] = (2048, 8192)  # 8192 x 1024 (LayerNorm) and 8192 x 4096 (GELU): the targets
    widths: tuple[int, ...] = (512, 1024, 4096)
    gelu_approximate: str = "none"
    # linear layers, (rows, in, out): all-MiniLM-L6-v2's feed-forward at batch 32 x 122 tokens and the encoder
    # layer case's; CPU only, at float32 (float16: computed in float32), elsewhere torch's linear is the engine
    linear_shapes: tuple[tuple[int, int, int], ...] = ((3904, 384, 1536), (3904, 1536, 384), (8192, 512, 2048),
                                                       (8192, 2048, 512))  # fmt: skip
    # encoder and decoder layers
    layer_batch: int = 8
    layer_length: int = 1024
    d_model: int = 512
    nhead: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "gelu"
    # how
    timing: TimingConfig = dataclasses.field(default_factory=TimingConfig)
    memory: bool = True
    memory_all_sizes: bool = True  # False: only the largest size of each case (--quick)
    quick: bool = False
    command: str = ""


@dataclasses.dataclass
class Result:
    info: RunInfo
    ceilings: Ceilings
    config: Config
    rows: list[dict[str, Any]]
    fallbacks: dict[str, str]  # case label -> why fusedformer is not fused there
    seconds: float


def default_config(quick: bool = False, **overrides: Any) -> Config:
    """The default run, or the ``--quick`` one (< 2 minutes on 2 busy cores); ``overrides`` win.

    ``lengths`` given without ``lengths_16bit`` sets both: the lengths asked for, at every dtype.
    """
    if quick:
        base = dict(
            attention_dtypes=("float32", "bfloat16"),
            lengths=(256, 1024),
            lengths_16bit=(256, 1024),
            decode_lengths=(4096,),
            rows=(4096,),
            widths=(1024, 4096),
            linear_shapes=((1024, 256, 1024),),
            layer_batch=4,
            layer_length=256,
            d_model=256,
            nhead=4,
            dim_feedforward=1024,
            timing=TimingConfig(max_repeats=5, min_repeats=3, budget_s=0.6, min_sample_s=0.01, warmup_s=0.02),
            memory_all_sizes=False,
            quick=True,
        )
    else:
        base = {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("lengths") is not None and overrides.get("lengths_16bit") is None:
        base["lengths_16bit"] = overrides["lengths"]
    return Config(**base)


def specs(config: Config) -> list[Spec]:
    """Every case shape the run measures, in order."""
    dev, dt = config.device, config.dtype
    out: list[Spec] = []
    for case in config.cases:
        if case == "attention":
            B, H, E = config.batch, config.heads, config.head_dim
            for adt in config.attention_dtypes:
                for causal in config.causal:
                    for L in config.lengths_16bit if adt in _16BIT else config.lengths:
                        out.append(Spec("attention", dict(B=B, H=H, L=L, S=L, E=E, causal=causal), dev, adt))
        elif case == "decode":
            for adt in config.attention_dtypes[:2]:
                for S in config.decode_lengths:
                    params = dict(B=config.decode_batch, H=config.decode_heads, L=1, S=S, E=config.head_dim)
                    out.append(Spec("decode", params, dev, adt))
        elif case in ROW_CASES:
            for rows in config.rows:
                for width in config.widths:
                    params: dict[str, Any] = dict(rows=rows, width=width)
                    if case == "gelu":
                        params["approximate"] = config.gelu_approximate
                    out.append(Spec(case, params, dev, dt))
        elif case == "linear":
            if config.device == "cpu" and dt in ("float32", "float16"):
                for rows, fin, fout in config.linear_shapes:
                    out.append(Spec("linear", dict(rows=rows, in_features=fin, out_features=fout), dev, dt))
        elif case in ("encoder", "decoder"):
            params = dict(
                batch=config.layer_batch,
                length=config.layer_length,
                d_model=config.d_model,
                nhead=config.nhead,
                dim_feedforward=config.dim_feedforward,
                dropout=config.dropout,
                activation=config.activation,
            )
            out.append(Spec(case, params, dev, dt))
        elif case == "varlen":
            # issue 9's target: 8 sequences of 64..1024 tokens, H=8, E=64; --quick: up to 256; and never
            # longer than the attention lengths asked for
            hi = min(256 if config.quick else 1024, max(config.lengths))
            lengths = varlen_lengths(8, max(1, hi // 16), hi)
            for causal in config.causal:
                out.append(Spec("varlen", dict(lengths=lengths, H=8, E=64, causal=causal), dev, dt))
        else:
            raise ValueError(f"unknown case {case!r}; expected some of {', '.join(CASES)}")
    return out


def _memory_specs(config: Config, all_specs: list[Spec]) -> set[str]:
    """The specs (as JSON) whose memory is probed: all, or per case (and causal, and dtype) the largest."""
    if not config.memory:
        return set()
    if config.memory_all_sizes:
        return {s.to_json() for s in all_specs}
    largest: dict[tuple, Spec] = {}

    def size(s: Spec) -> float:
        return math.prod(v for v in s.params.values() if isinstance(v, int) and not isinstance(v, bool))

    for s in all_specs:
        key = (s.case, s.params.get("causal"), s.dtype)
        if key not in largest or size(s) > size(largest[key]):
            largest[key] = s
    return {s.to_json() for s in largest.values()}


def _modes_of(config: Config, spec: Spec) -> tuple[str, ...]:
    if spec.case == "decode":
        return ("fwd",)  # inference
    return config.layer_modes if spec.case in ("encoder", "decoder") else config.modes


def _base_row(info: RunInfo, config: Config, case: Case, provider: str, mode: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "machine": info.machine,
        "cpu_features": info.features_csv,
        "device": info.device,
        "threads": info.threads,
        "date": info.date,
        "version": info.version,
        "commit": info.commit,
        "torch_version": info.torch,
        "load_avg": round(info.load_avg, 2),
        "case": case.spec.case,
        "shape": case.label(),
        "provider": provider,
        "mode": mode,
        "dtype": case.spec.dtype,
    }
    row.update(case.spec.params)
    return row


def _fmt_gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB"


class _Progress:
    """tqdm on stderr when it is installed, a plain line per step otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True, leave=False)
            except ImportError:
                pass
        self.done, self.total = 0, total

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=True)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(config: Config, progress: bool = True, log: Callable[[str], None] | None = None) -> Result:
    """Measure every case of ``config``; returns the rows (see the module doc)."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    device = torch.device(config.device)
    info = run_info(device)
    all_specs = specs(config)
    # a GEMM ceiling for every dtype a row is measured in, and for the run's dtype
    ceiling_dtypes = list(dict.fromkeys([config.dtype, *(s.dtype for s in all_specs)]))
    log(f"fusedformer-bench: {info.machine}; {info.threads} torch threads; measuring the ceilings ...")
    ceilings = measure_ceilings(device, ceiling_dtypes, quick=config.quick)
    log(f"ceilings at start: {'; '.join(ceilings.describe())}")

    probe_specs = _memory_specs(config, all_specs)
    total = 0
    for s in all_specs:
        modes = _modes_of(config, s)
        total += len(_timing_groups(modes))
        if s.to_json() in probe_specs:
            kinds = int("fwd" in modes) + int(any(m in modes for m in ("bwd", "fwd+bwd")))
            total += kinds * len([p for p in config.providers if p in make_case(s).providers])
    bar = _Progress(total, progress)
    rows: list[dict[str, Any]] = []
    fallbacks: dict[str, str] = {}
    probe = memory.MemoryProbe(threads=torch.get_num_threads()) if probe_specs else None
    try:
        with warnings.catch_warnings():
            # the report names every fallback (backend column, footnote): no need for the one-time warning
            warnings.simplefilter("ignore", ff.FallbackWarning)
            for spec in all_specs:
                case = make_case(spec)
                spec_rows = _run_spec(config, info, ceilings, case, bar)
                if "fusedformer" in config.providers and case.is_fallback("fusedformer"):
                    fallbacks[f"{spec.case} {spec.dtype} {case.label()}"] = case.fallback_reason()
                if probe is not None and spec.to_json() in probe_specs:
                    _probe_spec(config, case, spec_rows, probe, bar)
                rows.extend(spec_rows)
                del case
                gc.collect()
    finally:
        bar.close()
        if probe is not None:
            probe.close()
    log("measuring the ceilings again ...")
    ceilings = best_of(ceilings, measure_ceilings(device, ceiling_dtypes, quick=config.quick))
    _fill_shares(rows, ceilings)
    return Result(info, ceilings, config, rows, fallbacks, time.perf_counter() - t_start)


def skip_reason(case: Case, provider: str, mode: str) -> str | None:
    """Why ``provider`` must not run ``case`` here: its estimated memory exceeds what is free."""
    need = case.estimate_bytes(provider, mode)
    free = memory.available_bytes(case.spec.device)
    if free is None:
        return None
    if need > _MEMORY_SHARE * free - _MEMORY_RESERVE:
        return f"skipped: would need ~{_fmt_gib(need)} (machine has {_fmt_gib(free)} free)"
    return None


def _timing_groups(modes: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The timed measurements: fwd alone; bwd and fwd+bwd together, from the same calls (train_unit)."""
    groups: list[tuple[str, ...]] = []
    if "fwd" in modes:
        groups.append(("fwd",))
    train = tuple(m for m in modes if m in ("bwd", "fwd+bwd"))
    if train:
        groups.append(train)
    return groups


def _run_spec(config: Config, info: RunInfo, ceilings: Ceilings, case: Case, bar: _Progress) -> list[dict]:
    providers = [p for p in config.providers if p in case.providers]
    modes = _modes_of(config, case.spec)
    by_mode: dict[str, dict[str, dict[str, Any]]] = {}
    for group in _timing_groups(modes):
        what = "+".join(group) if len(group) == 1 else "bwd, fwd+bwd"
        bar.describe(f"{case.spec.case} {case.spec.dtype} {case.label()} {what}")
        group_rows = {m: {p: _base_row(info, config, case, p, m) for p in providers} for m in group}
        units = {}
        for p in providers:
            rows_p = [group_rows[m][p] for m in group]
            why = case.unavailable(p)
            if why is None:
                for row in rows_p:
                    row["backend"] = case.backend(p)
                    row["fallback"] = case.is_fallback(p)
                    if p == "fusedformer" and case.spec.case == "attention" and not row["fallback"]:
                        row["matmul_engine"] = info.matmul_engines.get(case.spec.dtype)
                why = skip_reason(case, p, "fwd" if group == ("fwd",) else "fwd+bwd")
            if why is None:
                try:
                    units[p] = unit(case, p, "fwd") if group == ("fwd",) else train_unit(case, p)
                except Exception as e:  # building the inputs or the module failed: say so in the row
                    why = f"error: {type(e).__name__}: {e}"
            if why is not None:
                for row in rows_p:
                    row["status"] = why
        stats = measure(units, config.timing, torch.device(case.spec.device)) if units else {}
        for p, st in stats.items():
            for m in group:
                row = group_rows[m][p]
                if isinstance(st, BaseException):
                    row["status"] = f"error: {type(st).__name__}: {st}"
                else:
                    _fill_stats(row, case, m, st.tail() if m == "bwd" else st, ceilings)
        for m in group:
            _fill_ratios(group_rows[m])
        by_mode.update(group_rows)
        del units
        bar.step()
    return [row for m in modes for row in by_mode[m].values()]


def _fill_stats(row: dict[str, Any], case: Case, mode: str, st: Stats, ceilings: Ceilings) -> None:
    row["status"] = "ok"
    row["repeats"] = len(st.samples_ms)
    row["calls_per_sample"] = st.number
    for key in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "spread_pct"):
        row[key] = getattr(st, key)
    kind, rate = flop_or_byte_rate(case, mode, st.median_ms / 1e3)
    row[kind] = rate
    row["ceiling"] = "GEMM" if kind == "gflops" else "copy"


def _fill_shares(rows: list[dict[str, Any]], ceilings: Ceilings) -> None:
    """Each rate's share of the ceiling it is bound by: FLOP/s of the GEMM ceiling of the row's own
    dtype (a bfloat16 row against bfloat16 ``torch.mm``), bytes/s of the copy ceiling."""
    for row in rows:
        if row.get("status") != "ok":
            continue
        rate = row.get("gflops") if row["ceiling"] == "GEMM" else row.get("gbps")
        ceiling = ceilings.gemm_gflops(row["dtype"]) if row["ceiling"] == "GEMM" else ceilings.copy_gbps
        row["ceiling_rate"] = ceiling  # in the unit of the rate: GFLOP/s or GB/s
        row["share_of_ceiling_pct"] = 100.0 * rate / ceiling if ceiling > 0 else float("nan")


def _fill_ratios(mode_rows: dict[str, dict[str, Any]]) -> None:
    """ratio_vs_X = X's median / this provider's median: above 1, this provider is faster than X."""
    for other in ("torch", "naive", "torch-loop", "read"):
        ref = mode_rows.get(other, {}).get("median_ms")
        for row in mode_rows.values():
            mine = row.get("median_ms")
            if ref and mine:
                row[f"ratio_vs_{other}"] = ref / mine


def _probe_spec(
    config: Config, case: Case, rows: list[dict[str, Any]], probe: memory.MemoryProbe, bar
) -> None:
    modes = _modes_of(config, case.spec)
    kinds = [
        k for k, want in (("fwd", "fwd" in modes), ("train", "bwd" in modes or "fwd+bwd" in modes)) if want
    ]
    by_key = {(r["provider"], r["mode"]): r for r in rows}
    for p in [p for p in config.providers if p in case.providers]:
        for kind in kinds:
            bar.describe(f"memory {case.spec.case} {case.spec.dtype} {case.label()} {p} {kind}")
            kind_modes = ["fwd"] if kind == "fwd" else [m for m in ("bwd", "fwd+bwd") if m in modes]
            targets = [by_key[(p, m)] for m in kind_modes if (p, m) in by_key]
            # a call that was skipped or could not run is not probed: its row already says why
            if any(not str(t.get("status", "")).startswith(("ok", "error")) for t in targets):
                for t in targets:
                    t["memory_status"] = t.get("status", "")
                bar.step()
                continue
            result = probe.measure(case.spec, p, kind)
            for m, t in zip(kind_modes, targets):
                if "error" in result:
                    t["memory_status"] = f"error: {result['error']}"
                elif result.get(m) is None:
                    t["memory_status"] = "n/a: the high-water mark could not be reset"
                else:
                    t["peak_extra_mib"] = result[m]
                    t["memory_status"] = (
                        "ok" if result.get("hwm_reset", True) else "ok (no reset: upper bound)"
                    )
            bar.step()
