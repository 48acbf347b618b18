"""Smoke tests of the benchmark harness (fusedformer.bench): the command end to end on tiny sizes, the
memory probe, the skip rule, the interleaving, the FLOP counts and the fallback reporting."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fusedformer as ff
from fusedformer.bench import cases, report, runner, timing
from fusedformer.bench.cases import Spec
from fusedformer.bench.memory import MemoryProbe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--quick", "--lengths", "64", "--rows", "64", "--widths", "128",
    "--layer-batch", "1", "--layer-length", "16", "--d-model", "32", "--nhead", "2", "--dim-feedforward", "64",
    "--repeats", "2", "--budget", "0.05", "--no-progress",
]  # fmt: skip


def _attention_falls_back() -> bool:
    q = torch.empty(1, 8, 64, 64)
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
    # attention: 1 length x 2 masks x 3 modes x 3 providers; LayerNorm, GELU: 1 shape x 3 x 3;
    # encoder, decoder: fwd+bwd x 2 providers
    counts = {c: sum(r["case"] == c for r in rows) for c in cases.CASES}
    assert counts == {"attention": 18, "layer_norm": 9, "gelu": 9, "encoder": 2, "decoder": 2}
    for r in rows:
        for key in ("machine", "date", "version", "commit", "backend" if r["status"] == "ok" else "status"):
            assert r[key], (key, r)
        assert r["status"] == "ok" or r["status"].startswith("unavailable"), r
        if r["status"] != "ok":
            continue
        assert float(r["median_ms"]) > 0 and float(r["q1_ms"]) <= float(r["median_ms"]) <= float(r["q3_ms"])
        rate = r["gflops"] if r["case"] not in ("layer_norm", "gelu") else r["gbps"]
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
    fallback = _attention_falls_back()
    for r in attention:
        assert r["fallback"] == str(fallback)
        assert ("FALLBACK" in r["backend"]) == fallback
    assert ("NOT a fused result" in proc.stdout) == any(r["fallback"] == "True" for r in _rows(out))


def test_cli_prints_table_with_machine_and_writes_plots(tiny_run):
    proc, out = tiny_run
    assert "machine:" in proc.stdout and "torch threads" in proc.stdout
    assert "ff/torch" in proc.stdout and "run): GEMM" in proc.stdout
    assert (out / "report.txt").read_text().strip() in proc.stdout
    for name in ("attention_time.png", "attention_memory.png", "rows_throughput.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "attention_time.png" in (out / "report.md").read_text()


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
        memory=False,
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


@pytest.mark.parametrize("causal", [False, True])
def test_attention_flop_count_is_flash_attentions(causal):
    B, H, L, S, E = 2, 3, 128, 256, 64
    case = cases.make_case(Spec("attention", {"B": B, "H": H, "L": L, "S": S, "E": E, "causal": causal}))
    fwd = 4 * B * H * L * S * E / (2 if causal else 1)
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
