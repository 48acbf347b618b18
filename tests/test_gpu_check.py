"""make gpu-check (fusedformer/bench/gpu_check.py): what can be checked without a GPU.

Its no-GPU path (an error within seconds that names the reason), its case list and its report writer.
The timings and the gpu-marked tests it runs need a GPU; nothing here pretends to check them.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fusedformer.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
has_gpu = torch.cuda.is_available() or shutil.which("nvidia-smi") is not None


@pytest.mark.skipif(has_gpu, reason="a GPU is present: make gpu-check would run for minutes")
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_fails_within_seconds_without_a_gpu():
    start = time.monotonic()
    proc = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "cannot run here" in proc.stderr and "GPU" in proc.stderr, proc.stderr
    assert time.monotonic() - start < 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_script_says_why_it_cannot_run(capsys, tmp_path):
    start = time.monotonic()
    assert gpu_check.main(["--out", str(tmp_path / "gpu")]) == 2
    err = capsys.readouterr().err
    assert "cannot run here" in err and ("CUDA" in err or "TRITON_INTERPRET" in err), err
    assert not (tmp_path / "gpu").exists()  # nothing written, nothing compiled
    assert time.monotonic() - start < 5


def test_cases_cover_ops_lengths_and_dtypes():
    cases = list(gpu_check._cases())
    main = {(op, dtype, L) for op, dtype, L, *_ in cases if op in ("attention", "layer_norm", "gelu")}
    assert main == {
        (op, dtype, L)
        for op in ("attention", "layer_norm", "gelu")
        for dtype in (torch.float16, torch.bfloat16)
        for L in (1024, 2048, 4096, 8192, 16384)
    }
    extra = {(op, dtype, L, modes) for op, dtype, L, *_, modes in cases if op not in ("attention", "layer_norm", "gelu")}
    assert extra == {
        (op, dtype, L, modes)
        for dtype in (torch.float16, torch.bfloat16)
        for op, Ls, modes in (("attention dropout 0.1", (4096, 16384), ("fwd+bwd",)),
                              ("decode (SDPA default backend)", (32768, 131072), ("fwd",)))
        for L in Ls
    }


def test_report_table_and_csv(tmp_path):
    def row(op, provider, ms, status="ok"):
        return dict(op=op, dtype="float16", L=1024, shape="s", mode="fwd", provider=provider, ms=ms,
                    ms_p20=ms, ms_p80=ms, rate="1.0", unit="GB/s", status=status)

    rows = [row("gelu", "fusedformer", "0.5000"), row("gelu", "torch", "1.0000"),
            row("layer_norm", "fusedformer", "", "not run: time budget spent"),
            row("layer_norm", "torch", "")]
    gpu_check.write_report(tmp_path, ["GPU: test"], (False, "1 failed"), rows)
    table = (tmp_path / "gpu-check.md").read_text()
    assert "FAILED" in table and "GPU: test" in table
    gelu_row = "| gelu | float16 | 1024 | s | fwd | 0.5000 [0.5000-0.5000] | 1.0000 [1.0000-1.0000] | 2.00x |"
    assert gelu_row in table
    assert "not run: time budget spent" in table
    with open(tmp_path / "gpu-check.csv") as f:
        assert [r["ms"] for r in csv.DictReader(f)] == ["0.5000", "1.0000", "", ""]
