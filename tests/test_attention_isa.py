"""CPU attention on every path of oneDNN's JIT this machine can take: the native ISA and capped ones.

The tile products run on oneDNN's batch-reduce GEMM, which compiles for the ISA it detects, and
reads ``ONEDNN_MAX_CPU_ISA`` once per process to cap it: under a cap below AMX it will not pack bf16
or fp16 operands (``could_pack`` is false), so bf16 attention runs on VNNI pairs that we pack where
brgemm still takes them (AVX512-BF16), on fp32 tiles otherwise; under AVX2 its fp32 kernels are AVX2
code. Each cap therefore runs in a subprocess, which holds every
dtype and every engine (``native``, ``brgemm-f32``, ``brgemm``) to the house rule of
test_attention.py (2x / 3x the error of the reference in the same dtype, against float64).

On a CPU without AMX the native run already is the non-AMX path, and a cap above the CPU's own ISA
changes nothing; the AMX path runs here only where the CPU has it (the subprocess reports which).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

# None: oneDNN's own choice (AMX-BF16 where the CPU has it). The values are oneDNN's names.
CAPS = [None, "AVX512_CORE_BF16", "AVX2"]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = _cpu_flags()

_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_attention import check_attention, qkv
    from fusedformer import _C

    torch.manual_seed(0)
    report = {{"engines": {{}}, "candidates": {{}}}}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        _C.set_attention_engine(name, "auto")
        report["candidates"][name] = _C.attention_engine(name)["candidates"]
        for engine in ("brgemm", "brgemm-f32", "native"):
            _C.set_attention_engine(name, engine)
            report["engines"][name + "/" + engine] = _C.attention_engine(name)["fwd"]
            # causal with L > S and L < S, GQA, odd head dims and Ev != E, a bool mask, dropout
            check_attention(*qkv(1, 2, 2, 97, 130, 64, 64, dtype), is_causal=True)
            check_attention(*qkv(2, 4, 2, 130, 77, 59, 40, dtype), enable_gqa=True)
            q, k, v = qkv(2, 2, 2, 65, 200, 80, 48, dtype)
            check_attention(q, k, v, attn_mask=torch.rand(2, 1, 65, 200) < 0.7, is_causal=True)
            out = torch.nn.functional.scaled_dot_product_attention  # the dropout path must run too
            import fusedformer as ff
            q, k, v = [t.requires_grad_() for t in qkv(1, 2, 2, 70, 70, 32, 32, dtype)]
            ff.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True).sum().backward()
            assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        _C.set_attention_engine(name, "auto")
    # ff.linear's brgemm under the same cap: many rows (packed weight) and few rows (weight as A)
    import fusedformer as ff
    for rows in (70, 5):
        x, w, b = torch.randn(rows, 300), torch.randn(130, 300) / 300 ** 0.5, torch.randn(130)
        truth = torch.nn.functional.linear(x.double(), w.double(), b.double())
        err = (ff.linear(x, w, b).double() - truth).abs().max().item()
        err_torch = (torch.nn.functional.linear(x, w, b).double() - truth).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, (rows, err, err_torch)
        # its backward's products (grad_weight transposes grad here: 130 outputs < 300 inputs)
        g = torch.randn(rows, 130)
        for got, same, exact in (
            (torch.ops.fusedformer.linear_bwd_input(g, w), g @ w, g.double() @ w.double()),
            (torch.ops.fusedformer.linear_bwd_weight(g, x), g.t() @ x, g.double().t() @ x.double()),
        ):
            err, err_torch = ((t.double() - exact).abs().max().item() for t in (got, same))
            assert err <= 3 * err_torch + 1e-6, (rows, err, err_torch)
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("cap", CAPS, ids=lambda c: c or "native")
def test_every_engine_under_isa_cap(cap):
    env = dict(os.environ, FUSEDFORMER_BACKEND="cpp")
    env.pop("FUSEDFORMER_CPU_MATMUL", None)
    if cap is None:
        env.pop("ONEDNN_MAX_CPU_ISA", None)
    else:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(tests=str(TESTS))],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    # bf16 products on VNNI pairs: packed by oneDNN where it may use AMX-BF16 (our code only decides
    # whether to pack, from oneDNN's own answer), packed by us where brgemm takes the pairs without AMX
    # (AVX512-BF16: vdpbf16ps; not under the AVX2 cap); fp32 tiles elsewhere.
    packs_bf16 = "amx_bf16" in FLAGS and cap is None
    assert ("onednn-brgemm-bf16-vnni" in report["candidates"]["bfloat16"]) == packs_bf16, report
    if packs_bf16:
        expected = {"onednn-brgemm-bf16-vnni"}
    elif cap == "AVX2" or "avx512bw" not in FLAGS:
        expected = {"onednn-brgemm-f32"}
    elif "avx512_bf16" in FLAGS:
        expected = {"onednn-brgemm-bf16-pairs"}
    else:  # AVX-512 without its bf16 instructions: oneDNN's call (it may emulate them)
        expected = {"onednn-brgemm-bf16-pairs", "onednn-brgemm-f32"}
    assert report["engines"]["bfloat16/brgemm"] in expected, report
    packs_fp16 = "amx_fp16" in FLAGS and cap is None
    assert ("onednn-brgemm-f16-vnni" in report["candidates"]["float16"]) == packs_fp16, report
    fp16_pairs = not packs_fp16 and cap is None and "avx512_fp16" in FLAGS
    assert ("onednn-brgemm-f16-pairs" in report["candidates"]["float16"]) == fp16_pairs, report
    assert report["engines"]["float32/brgemm"] == "onednn-brgemm-f32"
    assert report["engines"]["float32/native"] == "native"


def test_engine_report_and_override():
    """The engine per dtype is measured once, reported with its timings, and can be forced."""
    from fusedformer import _C

    info = _C.attention_engine("float32")
    assert info["fwd"] in info["candidates"] and info["fwd"] == info["bwd"]
    if info["how"] == "measured":
        assert set(info["timings_ms"]) == set(info["candidates"])
        assert all(f > 0 and b > 0 for f, b in info["timings_ms"].values())
    try:
        _C.set_attention_engine("float32", "native")
        assert _C.attention_engine("float32")["fwd"] == "native"
        assert _C.attention_engine("float32")["how"] == "set by set_attention_engine"
        _C.set_attention_engine("float64", "brgemm")  # float64 has only the native engine
        assert _C.attention_engine("float64")["fwd"] == "native"
        with pytest.raises(RuntimeError, match="expected 'auto'"):
            _C.set_attention_engine("float32", "cublas")
        with pytest.raises(RuntimeError, match="dtype name"):
            _C.set_attention_engine("int8", "native")
    finally:
        _C.set_attention_engine("float32", "auto")
        _C.set_attention_engine("float64", "auto")


def test_explain_names_the_engine():
    import fusedformer as ff

    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    ff.scaled_dot_product_attention(q, q, q)  # measured by now
    text = str(ff.explain(ff.scaled_dot_product_attention, q, q, q))
    assert "tile products on " in text and ff.backends.cpu_matmul_engines(("bfloat16",))["bfloat16"] in text
