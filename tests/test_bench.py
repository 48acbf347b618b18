"""Smoke tests of the benchmark harness (fusedformer.bench): the command end to end on tiny sizes, the
memory probe, the skip rule, the interleaving, the FLOP counts, the fallback reporting, the machine's
features, the per-dtype ceilings and the targets' lookups."""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fusedformer as ff
from fusedformer import backends
from fusedformer.bench import cases, machine, report, runner, targets, timing
from fusedformer.bench.cases import Spec
from fusedformer.bench.ceilings import Ceilings, GemmCeiling
from fusedformer.bench.memory import MemoryProbe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--quick", "--lengths", "64", "--rows", "64", "--widths", "128",
    "--layer-batch", "1", "--layer-length", "16", "--d-model", "32", "--nhead", "2", "--dim-feedforward", "64",
    "--linear-shapes", "70x33x24", "--repeats", "2", "--budget", "0.05", "--no-progress",
]  # fmt: skip


def _attention_falls_back(dtype: str = "float32") -> bool:
    q = torch.empty(1, 8, 64, 64, dtype=getattr(torch, dtype))
    return ff.explain(ff.scaled_dot_product_attention, q, q, q).backend == "reference"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "fusedformer.bench", *TINY, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_csv_with_every_case_mode_provider(tiny_run):
    _, out = tiny_run
    with open(out / "results.csv", newline="") as f:
        assert next(csv.reader(f)) == report.CSV_COLUMNS
    rows = _rows(out)
    # attention: 2 dtypes (--quick: float32, bfloat16) x 1 length x 2 masks x 3 modes x 3 providers;
    # decode: 2 dtypes x 1 length x fwd x 4 providers (with "read", K and V read once); varlen: 2 masks x 3 modes x 3 providers (fusedformer,
    # torch on the padded batch, torch-loop);
    # LayerNorm, RMSNorm, the add + norms, GELU: 1 shape x 3 x 3; linear: 1 shape x 3 modes x 2 providers
    # (fusedformer, torch); encoder, decoder: fwd+bwd x 2 providers
    counts = {c: sum(r["case"] == c for r in rows) for c in cases.CASES}
    assert counts == {"attention": 36, "decode": 8, "layer_norm": 9, "rms_norm": 9, "add_layer_norm": 9,
                      "add_rms_norm": 9, "gelu": 9, "linear": 6, "encoder": 2, "decoder": 2, "varlen": 18}  # fmt: skip
    dtypes = {(r["case"], r["dtype"]) for r in rows}
    assert {d for c, d in dtypes if c in ("attention", "decode")} == {"float32", "bfloat16"}
    assert {d for c, d in dtypes if c not in ("attention", "decode")} == {"float32"}
    for r in rows:
        for key in ("machine", "cpu_features", "date", "version", "commit",
                    "backend" if r["status"] == "ok" else "status"):  # fmt: skip
            assert r[key], (key, r)
        assert r["status"] == "ok" or r["status"].startswith("unavailable"), r
        if r["status"] != "ok":
            continue
        assert float(r["median_ms"]) > 0 and float(r["q1_ms"]) <= float(r["median_ms"]) <= float(r["q3_ms"])
        rate = r["gflops"] if r["case"] not in (*cases.ROW_CASES, "decode") else r["gbps"]
        assert float(rate) > 0 and float(r["share_of_ceiling_pct"]) > 0
        assert float(r["peak_extra_mib"]) >= 0, r  # one size per case: --quick probes it


def test_cli_ratios_point_the_documented_way(tiny_run):
    rows = _rows(tiny_run[1])
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["shape"], r["mode"]), {})[r["provider"]] = r
    checked = 0
    for by_p in groups.values():
        if by_p.get("torch", {}).get("status") != "ok":
            continue
        assert float(by_p["torch"]["ratio_vs_torch"]) == pytest.approx(1.0)
        ff_row = by_p.get("fusedformer")
        if ff_row and ff_row["status"] == "ok":
            expected = float(by_p["torch"]["median_ms"]) / float(ff_row["median_ms"])
            assert float(ff_row["ratio_vs_torch"]) == pytest.approx(expected, rel=1e-3)
            checked += 1
    assert checked > 0


def test_cli_reports_the_backend_and_marks_fallbacks(tiny_run):
    proc, out = tiny_run
    attention = [r for r in _rows(out) if r["case"] == "attention" and r["provider"] == "fusedformer"]
    for r in attention:
        fallback = _attention_falls_back(r["dtype"])
        assert r["fallback"] == str(fallback)
        assert ("FALLBACK" in r["backend"]) == fallback
    assert ("NOT a fused result" in proc.stdout) == any(r["fallback"] == "True" for r in _rows(out))


def test_cli_shares_are_of_the_rows_own_dtype_ceiling(tiny_run):
    rows = [r for r in _rows(tiny_run[1]) if r["status"] == "ok" and r["ceiling"] == "GEMM"]
    ceiling_of: dict[str, set[str]] = {}
    for r in rows:
        ceiling_of.setdefault(r["dtype"], set()).add(r["ceiling_rate"])
        share = 100 * float(r["gflops"]) / float(r["ceiling_rate"])
        assert float(r["share_of_ceiling_pct"]) == pytest.approx(share, rel=1e-4), r
    # one GEMM ceiling per dtype, and the report lists each with its dtype
    assert set(ceiling_of) == {"float32", "bfloat16"} and all(len(v) == 1 for v in ceiling_of.values())
    assert ceiling_of["float32"] != ceiling_of["bfloat16"]
    text = (tiny_run[1] / "report.txt").read_text()
    listed = {m[1]: float(m[2]) for m in re.finditer(r"^  GEMM (\w+) ([\d.]+) GFLOP/s", text, re.MULTILINE)}
    in_sections = {m[1]: float(m[2]) for m in re.finditer(r"% of (\w+) GEMM (\d+)\)", text)}
    assert set(listed) == set(in_sections) == set(ceiling_of)
    for dtype, (rate,) in ceiling_of.items():  # the CSV's 6 digits against the report's rounding
        assert listed[dtype] == pytest.approx(float(rate), abs=0.051), dtype
        assert in_sections[dtype] == pytest.approx(float(rate), abs=0.51), dtype


def test_cli_prints_table_with_machine_and_writes_plots(tiny_run):
    proc, out = tiny_run
    assert "machine:" in proc.stdout and "torch threads" in proc.stdout
    assert f"cpu features: {machine.features_text(machine.cpu_features(machine._read_cpuinfo()))}" in proc.stdout
    assert "ff/torch" in proc.stdout and "\n  GEMM float32 " in proc.stdout
    assert "S=L float32" in proc.stdout and "S=L bfloat16" in proc.stdout  # a section per dtype
    assert (out / "report.txt").read_text().strip() in proc.stdout
    names = [f"attention_{kind}_{dtype}.png" for kind in ("time", "memory") for dtype in ("float32", "bfloat16")]
    for name in [*names, "rows_throughput.png"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "attention_time_bfloat16.png" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def probe():
    with MemoryProbe() as p:
        yield p


def _attention(L: int) -> Spec:
    return Spec("attention", {"B": 1, "H": 8, "L": L, "S": L, "E": 64, "causal": False})


def test_memory_probe_measures_a_call(probe):
    result = probe.measure(_attention(64), "torch", "train")
    assert result.get("hwm_reset") is True, result
    assert result["fwd+bwd"] > 0 and result["bwd"] > 0


def test_memory_probe_sees_the_naive_scores(probe):
    L = 1024
    scores_mib = 8 * L * L * 4 / 2**20  # one (B, H, L, S) float32 buffer: 32 MiB
    naive = probe.measure(_attention(L), "naive", "fwd")["fwd"]
    torch_sdpa = probe.measure(_attention(L), "torch", "fwd")["fwd"]
    assert naive >= scores_mib, naive
    assert torch_sdpa < naive / 4, (torch_sdpa, naive)


def test_memory_probe_naive_exceeds_fused(probe):
    assert not _attention_falls_back(), "fusedformer attention runs on the reference path: nothing fused to measure"
    naive = probe.measure(_attention(1024), "naive", "fwd")["fwd"]
    fused = probe.measure(_attention(1024), "fusedformer", "fwd")["fwd"]
    assert fused < naive / 4, (fused, naive)


def test_naive_is_skipped_where_its_scores_cannot_fit():
    case = cases.make_case(_attention(2**17))  # 8 x 2^34 float32 scores: 512 GiB
    why = runner.skip_reason(case, "naive", "fwd")
    assert why is not None and why.startswith("skipped: would need"), why
    assert runner.skip_reason(case, "torch", "fwd") is None


def test_run_reports_a_skipped_naive_row():
    config = runner.default_config(
        quick=True, cases=("attention",), providers=("naive",), modes=("fwd",), lengths=(2**17,), causal=(False,),
        attention_dtypes=("float32",), memory=False,
    )  # fmt: skip
    result = runner.run(config, progress=False, log=lambda _: None)
    (row,) = result.rows
    assert row["status"].startswith("skipped: would need")
    assert "skipped*" in report.format_report(result)


def test_timing_interleaves_and_excludes_warmup():
    calls: list[str] = []
    units = {n: cases.Unit(run=lambda _, n=n: calls.append(n)) for n in "abc"}
    config = timing.TimingConfig(max_repeats=4, min_repeats=4, budget_s=0.0, min_sample_s=0.0, warmup_s=0.0)
    stats = timing.measure(units, config, torch.device("cpu"))
    assert calls[:3] == list("abc")  # warm-up (warmup_s=0: one call each), not counted
    assert "".join(calls[3:]) == "abc" + "bca" + "cab" + "abc"  # a rotated order each repeat
    assert all(isinstance(s, timing.Stats) and len(s.samples_ms) == 4 for s in stats.values())


def test_split_unit_times_the_part_after_the_mark():
    def run(_, mark):
        time.sleep(0.002)  # "forward"
        mark()
        time.sleep(0.004)  # "backward"

    config = timing.TimingConfig(max_repeats=3, min_repeats=3, budget_s=0.0, min_sample_s=0.0, warmup_s=0.0)
    stats = timing.measure({"x": cases.Unit(run, split=True)}, config, torch.device("cpu"))["x"]
    assert stats.median_ms >= 6.0
    assert 4.0 <= stats.tail().median_ms < stats.median_ms


def test_timing_reports_a_failing_provider_and_goes_on():
    def boom(_):
        raise RuntimeError("kernel exploded")

    units = {"good": cases.Unit(run=lambda _: None), "bad": cases.Unit(run=boom)}
    stats = timing.measure(units, timing.TimingConfig(max_repeats=3, budget_s=0.0), torch.device("cpu"))
    assert isinstance(stats["bad"], RuntimeError)
    assert isinstance(stats["good"], timing.Stats)


@pytest.mark.parametrize("L, S", [(128, 256), (256, 128), (97, 97), (1, 17), (17, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_flop_count_counts_the_scores_computed(causal, L, S):
    """4·E FLOPs per computed score (QK^T and PV), counted here from the mask itself, not from cases.py."""
    B, H, E = 2, 3, 64
    case = cases.make_case(Spec("attention", {"B": B, "H": H, "L": L, "S": S, "E": E, "causal": causal}))
    keep = torch.ones(L, S, dtype=torch.bool)
    if causal:  # torch's top-left alignment: query i sees keys j <= i
        keep = keep.tril()
    fwd = 4 * B * H * E * int(keep.sum())
    assert case.work("fwd") == ("flop", fwd)
    assert case.work("bwd") == ("flop", 2.5 * fwd)
    assert case.work("fwd+bwd") == ("flop", 3.5 * fwd)


def test_rows_byte_count():
    case = cases.make_case(Spec("layer_norm", {"rows": 10, "width": 8}))
    assert case.work("fwd") == ("byte", 2 * 10 * 8 * 4)
    assert case.work("fwd+bwd") == ("byte", 5 * 10 * 8 * 4)


def test_missing_fused_layer_is_unavailable(monkeypatch):
    monkeypatch.setattr(cases, "_fused_layer_class", lambda name: None)
    spec = Spec("encoder", {"batch": 1, "length": 8, "d_model": 16, "nhead": 2, "dim_feedforward": 32, "dropout": 0.0})
    case = cases.make_case(spec)
    assert case.unavailable("fusedformer").startswith("unavailable: fusedformer.nn.TransformerEncoderLayer")
    assert case.unavailable("torch") is None


@pytest.mark.filterwarnings("ignore::fusedformer.FallbackWarning")
def test_providers_compute_the_same_attention():
    """The three providers are benchmarked on the same inputs and agree (so the race is fair)."""
    case = cases.make_case(_attention(64))
    case.ensure_built()
    with torch.no_grad():
        outs = {p: case.forward_fn(p)() for p in cases.PROVIDERS}
    for p in ("fusedformer", "naive"):
        assert torch.allclose(outs[p], outs["torch"], atol=1e-4, rtol=1e-4), p
    assert not any(math.isnan(float(o.sum())) for o in outs.values())


# ---- the machine's features ------------------------------------------------------------------------

FAKE_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Fake Xeon 9999
flags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Fake Xeon 9999
flags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 amx_fp16 avx512_fp16
"""


def test_cpu_features_parse_the_first_processors_flags():
    features = machine.cpu_features(FAKE_CPUINFO)
    assert features == {
        "amx_tile": True, "amx_bf16": True, "amx_fp16": False, "avx512_bf16": True, "avx512_fp16": False,
    }  # fmt: skip
    text = machine.features_text(features)
    assert text == "AMX: amx_tile yes, amx_bf16 yes, amx_fp16 no | AVX512-BF16: yes | AVX512-FP16: no"
    info = dataclasses.replace(_fake_info(), cpu_features=features)
    assert info.features_csv == "amx_tile amx_bf16 avx512_bf16"
    assert "cpu features: " + text in info.header()


def test_cpu_features_without_cpuinfo_are_unknown():
    assert machine.cpu_features(None) is None  # no /proc/cpuinfo: not Linux
    assert machine.cpu_features("processor\t: 0\nmodel name\t: X\n") is None  # no flags line at all
    assert machine.features_text(None) == "unknown"
    assert _fake_info().features_csv == "unknown"
    arm = machine.cpu_features("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert arm is not None and not any(arm.values())
    assert dataclasses.replace(_fake_info(), cpu_features=arm).features_csv == "none"


def _fake_info() -> machine.RunInfo:
    return machine.RunInfo(
        machine="Fake Xeon 9999, 2 CPUs", device="cpu", threads=2, date="2026-01-01T00:00:00+00:00",
        version="0", commit="abc", torch="2", python="3", cpus=2, load_avg=0.0,
    )  # fmt: skip


def test_run_info_names_the_cpu_attention_engines(monkeypatch):
    engines = {"float32": "onednn-brgemm (avx512)", "bfloat16": "onednn-brgemm (amx)"}
    monkeypatch.setattr(backends, "cpu_matmul_engines", lambda: engines, raising=False)
    info = machine.run_info(torch.device("cpu"))
    assert info.matmul_engines == engines
    assert "float32 onednn-brgemm (avx512), bfloat16 onednn-brgemm (amx)" in info.header()


def test_run_info_without_engines_says_nothing_of_them(monkeypatch):
    monkeypatch.delattr(backends, "cpu_matmul_engines", raising=False)
    info = machine.run_info(torch.device("cpu"))
    assert info.matmul_engines == {} and not info.matmul_engines_error
    assert "engines" not in info.header()


def test_run_info_does_not_ask_for_cpu_engines_on_cuda(monkeypatch):
    def engines() -> dict[str, str]:
        raise AssertionError("asked for the CPU engines on a CUDA run")

    monkeypatch.setattr(backends, "cpu_matmul_engines", engines, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    info = machine.run_info(torch.device("cuda"))
    assert info.device == "Fake GPU" and info.matmul_engines == {} and not info.matmul_engines_error


def test_run_info_reports_a_failing_engine_query(monkeypatch):
    def engines() -> dict[str, str]:
        raise RuntimeError("no oneDNN")

    monkeypatch.setattr(backends, "cpu_matmul_engines", engines, raising=False)
    info = machine.run_info(torch.device("cpu"))
    assert info.matmul_engines == {} and "no oneDNN" in info.header()


# ---- the run's dtypes and ceilings -----------------------------------------------------------------


def test_quick_config_runs_attention_in_bfloat16_too():
    specs = runner.specs(runner.default_config(quick=True))
    attention = {(s.dtype, s.params["causal"], s.params["L"]) for s in specs if s.case == "attention"}
    assert {(dt, c) for dt, c, _ in attention} == {(dt, c) for dt in ("float32", "bfloat16") for c in (False, True)}
    assert {s.dtype for s in specs if s.case not in ("attention", "decode")} == {"float32"}
    assert {(s.dtype, s.params["S"]) for s in specs if s.case == "decode"} == {("float32", 4096), ("bfloat16", 4096)}


def test_default_config_runs_the_targets_rows_in_every_dtype():
    config = runner.default_config()
    specs = runner.specs(config)
    assert {"fwd", "fwd+bwd"} <= set(config.modes)
    attention = {(s.dtype, s.params["causal"], s.params["L"]) for s in specs if s.case == "attention"}
    for dtype in ("float32", "bfloat16", "float16"):
        assert {(dtype, False, 4096), (dtype, True, 4096), (dtype, True, 2048)} <= attention, dtype
    assert max(L for dt, _, L in attention if dt == "bfloat16") == 4096  # the shorter list
    assert max(L for dt, _, L in attention if dt == "float32") == 8192
    assert {s.dtype for s in specs if s.case not in ("attention", "decode")} == {"float32"}
    # the decode target's row: B=4, H=12, S=4096, E=64
    assert {("float32", 4, 12, 4096, 64), ("bfloat16", 4, 12, 4096, 64)} <= {
        (s.dtype, s.params["B"], s.params["H"], s.params["S"], s.params["E"]) for s in specs if s.case == "decode"
    }


def test_lengths_alone_apply_to_every_dtype():
    config = runner.default_config(lengths=(64,), attention_dtypes=("float32", "float16"), cases=("attention",))
    assert {(s.dtype, s.params["L"]) for s in runner.specs(config)} == {("float32", 64), ("float16", 64)}
    config = runner.default_config(lengths=(64,), lengths_16bit=(32,), cases=("attention",))
    assert {(s.dtype, s.params["L"]) for s in runner.specs(config)} == {
        ("float32", 64), ("bfloat16", 32), ("float16", 32),
    }  # fmt: skip


def test_cli_parses_attention_dtypes():
    from fusedformer.bench.__main__ import build_parser, config_from_args

    argv = ["--attention-dtypes", "bfloat16,float16", "--lengths-16bit", "128,256", "--dtype", "float64"]
    config = config_from_args(build_parser().parse_args(argv), argv)
    assert config.attention_dtypes == ("bfloat16", "float16") and config.lengths_16bit == (128, 256)
    assert config.dtype == "float64"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--attention-dtypes", "float8"])


def test_shares_are_of_each_rows_own_dtype_ceiling():
    ceilings = Ceilings(
        gemm={"float32": GemmCeiling("float32", 400.0, 390.0, 64), "bfloat16": GemmCeiling("bfloat16", 2000.0, 1900.0, 64)},
        copy_gbps=40.0, copy_gbps_median=39.0, copy_mib=1,
    )  # fmt: skip
    rows = [
        {"status": "ok", "dtype": "float32", "ceiling": "GEMM", "gflops": 300.0},
        {"status": "ok", "dtype": "bfloat16", "ceiling": "GEMM", "gflops": 300.0},
        {"status": "ok", "dtype": "bfloat16", "ceiling": "copy", "gbps": 20.0},
        {"status": "skipped: would need ~1 GiB", "dtype": "bfloat16"},
    ]
    runner._fill_shares(rows, ceilings)
    assert rows[0]["ceiling_rate"] == 400.0 and rows[0]["share_of_ceiling_pct"] == pytest.approx(75.0)
    assert rows[1]["ceiling_rate"] == 2000.0 and rows[1]["share_of_ceiling_pct"] == pytest.approx(15.0)
    assert rows[2]["ceiling_rate"] == 40.0 and rows[2]["share_of_ceiling_pct"] == pytest.approx(50.0)
    assert "share_of_ceiling_pct" not in rows[3]


def test_best_of_keeps_each_dtypes_better_ceiling():
    from fusedformer.bench.ceilings import best_of

    def ceilings(fp32: float, bf16: float, copy: float) -> Ceilings:
        gemm = {"float32": GemmCeiling("float32", fp32, fp32, 64), "bfloat16": GemmCeiling("bfloat16", bf16, bf16, 64)}
        return Ceilings(gemm, copy, copy, 1)

    best = best_of(ceilings(400.0, 1500.0, 30.0), ceilings(350.0, 2000.0, 40.0))
    assert (best.gemm_gflops("float32"), best.gemm_gflops("bfloat16"), best.copy_gbps) == (400.0, 2000.0, 40.0)
    assert math.isnan(best.gemm_gflops("float16"))


# ---- the targets -----------------------------------------------------------------------------------


def _target_row(dtype: str, L: int, causal: bool, mode: str, ratio: float, share: float = 0.0, **over) -> dict:
    row = {
        "case": "attention", "provider": "fusedformer", "dtype": dtype, "mode": mode, "B": "1", "H": "8",
        "E": "64", "L": str(L), "S": str(L), "causal": str(causal), "fallback": "False",
        "ratio_vs_torch": str(ratio), "share_of_ceiling_pct": str(share), "gflops": "1", "ceiling_rate": "1",
    }  # fmt: skip
    row.update(over)
    return row


def _targets(rows: list[dict]) -> dict[str, dict]:
    return {t["name"]: t for t in targets.evaluate(rows)}


def test_targets_read_each_dtypes_own_rows():
    rows = [
        _target_row("bfloat16", 4096, True, "fwd", 2.0),  # a bf16 row first: it must not answer fp32
        _target_row("float32", 4096, True, "fwd", 1.2),
        _target_row("float32", 4096, False, "fwd", 1.15, share=80.0),
        _target_row("bfloat16", 4096, False, "fwd", 1.05, share=40.0),
        _target_row("float32", 2048, True, "fwd+bwd", 1.4),
        _target_row("bfloat16", 2048, True, "fwd+bwd", 1.0, fallback="True"),  # a fallback is not measured
    ]
    t = _targets(rows)
    assert t["fp32 causal attention forward, L=4096, vs torch SDPA"]["measured"] == 1.2
    assert not t["fp32 causal attention forward, L=4096, vs torch SDPA"]["met"]  # 1.2 < 1.25
    assert t["bf16 causal attention forward, L=4096, vs torch SDPA"]["met"]
    assert t["fp32 non-causal attention forward, L=4096, vs torch SDPA"]["target"] == ">= 1.1"
    assert t["fp32 non-causal attention forward, L=4096, vs torch SDPA"]["met"]
    assert not t["bf16 non-causal attention forward, L=4096, vs torch SDPA"]["met"]
    assert t["fp32 causal attention forward+backward, L=2048, vs torch SDPA"]["met"]
    bf16_train = t["bf16 causal attention forward+backward, L=2048, vs torch SDPA"]
    assert bf16_train["measured"] is None and not bf16_train["met"]
    share32 = t["fp32 attention forward GFLOP/s vs fp32 GEMM GFLOP/s, L=4096 (non-causal)"]
    assert share32["target"] == ">= 0.75" and share32["measured"] == pytest.approx(0.8) and share32["met"]
    share16 = t["bf16 attention forward GFLOP/s vs bf16 GEMM GFLOP/s, L=4096 (non-causal)"]
    assert share16["target"] == ">= 0.5" and share16["measured"] == pytest.approx(0.4) and not share16["met"]
    causal_share = t["fp32 attention forward GFLOP/s vs fp32 GEMM GFLOP/s, L=4096 (causal)"]
    assert causal_share["target"] == ">= 0.65" and causal_share["measured"] == 0.0


def test_decode_is_held_to_reading_its_keys_and_values(tiny_run):
    """The decode rows' own ceiling: the "read" provider reads the same K and V once; fusedformer's
    ratio_vs_read is that time over its own (its share of the read ceiling)."""
    rows = [r for r in _rows(tiny_run[1]) if r["case"] == "decode" and r["status"] == "ok"]
    for dtype in ("float32", "bfloat16"):
        by_p = {r["provider"]: r for r in rows if r["dtype"] == dtype}
        assert by_p["read"]["backend"] == "aten:sum"
        expected = float(by_p["read"]["median_ms"]) / float(by_p["fusedformer"]["median_ms"])
        assert float(by_p["fusedformer"]["ratio_vs_read"]) == pytest.approx(expected, rel=1e-3)
    assert "ff/read" in (tiny_run[1] / "report.txt").read_text()


def test_decode_targets_read_the_issues_row():
    row = {"case": "decode", "provider": "fusedformer", "mode": "fwd", "dtype": "float32", "B": "4", "H": "12",
           "L": "1", "S": "4096", "E": "64", "fallback": "False", "ratio_vs_torch": "1.1", "ratio_vs_read": "0.8"}
    t = _targets([dict(row, S="1024", ratio_vs_torch="9", ratio_vs_read="9"), row])  # another S never answers
    assert t["fp32 decode attention (B=4, H=12, S=4096, E=64) vs torch SDPA"]["measured"] == 1.1
    assert t["fp32 decode attention (B=4, H=12, S=4096, E=64) vs torch SDPA"]["met"]
    read = t["fp32 decode attention (B=4, H=12, S=4096, E=64) vs reading K and V once"]
    assert read["measured"] == 0.8 and read["target"] == ">= 0.85" and not read["met"]


def test_targets_without_their_row_are_not_measured():
    # only bf16 rows, and an fp32 row at another shape (H=4): no fp32 target may read them
    rows = [_target_row("bfloat16", 4096, c, m, 9.0, share=99.0) for c in (False, True) for m in ("fwd", "fwd+bwd")]
    rows.append(_target_row("float32", 4096, True, "fwd", 9.0, share=99.0, H="4"))
    results = targets.evaluate(rows)
    fp32 = [t for t in results if t["name"].startswith("fp32")]
    assert fp32 and all(t["measured"] is None and not t["met"] for t in fp32)
    assert "not measured" in targets.markdown(results)
    assert _targets(rows)["bf16 causal attention forward, L=4096, vs torch SDPA"]["met"]


def test_the_gemm_ceiling_shrinks_where_one_call_would_take_too_long(monkeypatch):
    """A dtype the CPU has no hardware for (bf16 on AVX2: ~0.35 GFLOP/s) is measured at a smaller n, not for
    minutes; a fast one keeps its n, and the ceiling reports the n it used."""
    from fusedformer.bench import ceilings

    cpu, sync = torch.device("cpu"), (lambda: None)
    monkeypatch.setattr(ceilings, "_MAX_CALL_S", 1e-9)  # every size is too slow: down to the probe's
    assert ceilings._affordable_n(2048, torch.float32, cpu, sync) == ceilings._PROBE_N
    small = ceilings.measure_ceilings(cpu, ["float32"], gemm_n=1024)
    assert small.gemm["float32"].n == ceilings._PROBE_N and small.gemm["float32"].gflops > 0
    monkeypatch.setattr(ceilings, "_MAX_CALL_S", 1e9)  # nothing is too slow
    assert ceilings._affordable_n(2048, torch.float32, cpu, sync) == 2048
