"""``make gpu-check`` (``python -m fusedformer.bench.gpu_check``): the GPU path verified and timed in one go.

On one CUDA GPU, in about five minutes at most:

1. the ``gpu``-marked tests (``pytest tests -m gpu``, kernels compiled, one autotuning config per kernel:
   ``FUSEDFORMER_TRITON_TUNE=off``), within ``--test-budget`` seconds;
2. Triton attention, LayerNorm and GELU timed against torch (attention: ``F.scaled_dot_product_attention``
   held to its flash backend; ``F.layer_norm``; ``F.gelu(x + bias)``), forward and forward+backward,
   L = 1k..16k, float16 and bfloat16, autotuning over a few configs (``FUSEDFORMER_TRITON_TUNE=quick``);
   rows left when ``--budget`` runs out are written as not run.

Writes ``gpu-check.md`` (a table), ``gpu-check.csv``, ``tests.log`` and ``backward-profile.txt`` (torch.profiler
tables of a LayerNorm and an attention fwd+bwd step) under ``bench-results/gpu/``.
Exit status: 0 when the tests passed and every row ran, 1 otherwise, 2 without a usable GPU (decided
in seconds, before anything is compiled). Not part of CI: no machine of the project's CI has a GPU.

NOTE [2026-12-02] written without a GPU to run it on: its no-GPU path and its imports are tested
(tests/test_gpu_check.py); the rest is kept deliberately plain.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

LENGTHS = (1024, 2048, 4096, 8192, 16384)
TOKENS = 16384  # attention: batch = TOKENS // L, so every length does about the same work per key
HEADS, HEAD_DIM = 16, 64
WIDTH = 4096  # LayerNorm and GELU rows: (4, L, WIDTH)
FIELDS = ("op", "dtype", "L", "shape", "mode", "provider", "ms", "ms_p20", "ms_p80", "rate", "unit", "status")


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None. Imports torch and triton, touches no kernel."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set: the check runs compiled kernels; unset it"
    try:
        import torch
    except ImportError as e:
        return f"torch is not importable ({e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA (a CPU-only build; ROCm is not covered by this check)"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False: no CUDA device is visible (driver? CUDA_VISIBLE_DEVICES?)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    return None


def run_tests(out: Path, budget_s: float) -> tuple[bool, str]:
    """The gpu-marked tests in a subprocess; (passed, summary line). Output goes to ``out/tests.log``."""
    env = dict(os.environ, TRITON_INTERPRET="0", FUSEDFORMER_TRITON_TUNE="off")
    # a module that fails to import on this machine's torch/transformers must not stop the GPU tests
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
           "--continue-on-collection-errors"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget_s)
        log, passed = proc.stdout + proc.stderr, proc.returncode == 0
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log, passed = log + f"\n[gpu-check] the tests did not finish within {budget_s:.0f} s\n", False
    (out / "tests.log").write_text(" ".join(cmd) + "\n\n" + log)
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    return passed, (lines[-1] if lines else "no output")


def _time(fn) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of ``fn`` on the GPU (triton.testing.do_bench)."""
    import triton

    ms, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return ms, p20, p80


def _cases():
    """(op, dtype, L, shape text, make(provider) -> (fn, leaves), amount, backward factor, unit, modes)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fusedformer as ff

    for dtype in (torch.float16, torch.bfloat16):
        for L in LENGTHS:
            B = max(1, TOKENS // L)
            shape = f"B={B} H={HEADS} L=S={L} E={HEAD_DIM} causal"
            flops = 4 * B * HEADS * L * L * HEAD_DIM / 2  # FlashAttention's count, halved for causal

            def attention(provider, B=B, L=L, dtype=dtype):
                q, k, v = (torch.randn(B, HEADS, L, HEAD_DIM, device="cuda", dtype=dtype, requires_grad=True)
                           for _ in range(3))
                if provider == "fusedformer":
                    return lambda: ff.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v)

                def torch_flash():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

                return torch_flash, (q, k, v)

            yield "attention", dtype, L, shape, attention, flops, 2.5, "TFLOP/s", ("fwd", "fwd+bwd")

            if L in (4096, 16384):  # training with dropout: both kernels draw their own mask
                def attention_dropout(provider, B=B, L=L, dtype=dtype):
                    q, k, v = (torch.randn(B, HEADS, L, HEAD_DIM, device="cuda", dtype=dtype, requires_grad=True)
                               for _ in range(3))
                    if provider == "fusedformer":
                        return lambda: ff.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True), (q, k, v)

                    def torch_flash():
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)

                    return torch_flash, (q, k, v)

                yield ("attention dropout 0.1", dtype, L, shape, attention_dropout, flops, 2.5, "TFLOP/s",
                       ("fwd+bwd",))

                # decode: one query per sequence against a long cache, GQA (32 query heads, 8 KV heads)
                S = 8 * L
                dshape = f"B=8 Hq=32 Hk=8 L=1 S={S} E=128"
                kv_bytes = 2 * 8 * 8 * S * 128 * torch.finfo(dtype).bits // 8

                def decode(provider, S=S, dtype=dtype):
                    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=dtype)
                    k, v = (torch.randn(8, 8, S, 128, device="cuda", dtype=dtype) for _ in range(2))
                    fn = ff.scaled_dot_product_attention if provider == "fusedformer" else F.scaled_dot_product_attention
                    return lambda: fn(q, k, v, enable_gqa=True), ()

                yield "decode (SDPA default backend)", dtype, S, dshape, decode, kv_bytes, 0.0, "GB/s", ("fwd",)

            x_shape = (4, L, WIDTH)
            n_bytes = 2 * 4 * L * WIDTH * torch.finfo(dtype).bits // 8  # read x, write y

            def layer_norm(provider, x_shape=x_shape, dtype=dtype):
                x = torch.randn(x_shape, device="cuda", dtype=dtype, requires_grad=True)
                w = torch.randn(WIDTH, device="cuda", dtype=dtype, requires_grad=True)
                b = torch.randn(WIDTH, device="cuda", dtype=dtype, requires_grad=True)
                fn = ff.layer_norm if provider == "fusedformer" else F.layer_norm
                return lambda: fn(x, (WIDTH,), w, b), (x, w, b)

            yield "layer_norm", dtype, L, f"(4, {L}, {WIDTH})", layer_norm, n_bytes, 1.5, "GB/s", ("fwd", "fwd+bwd")

            def gelu(provider, x_shape=x_shape, dtype=dtype):
                x = torch.randn(x_shape, device="cuda", dtype=dtype, requires_grad=True)
                b = torch.randn(WIDTH, device="cuda", dtype=dtype, requires_grad=True)
                if provider == "fusedformer":
                    return lambda: ff.gelu(x, bias=b), (x, b)
                return lambda: F.gelu(x + b), (x, b)

            yield "gelu", dtype, L, f"(4, {L}, {WIDTH}) + bias", gelu, n_bytes, 1.5, "GB/s", ("fwd", "fwd+bwd")


def profile_backwards(out: Path) -> str:
    """torch.profiler tables (host and device time per op) of 10 fwd+bwd steps of LayerNorm (4, 1024, 4096)
    and causal attention (16, 16, 1024, 64) in float16, into ``out/backward-profile.txt``: where the fixed
    ~1 ms of every backward on the H200 (BENCHMARKS.md, 2026-12-04) goes. Returns a one-line summary."""
    import torch

    import fusedformer as ff

    def layer_norm_step():
        x = torch.randn(4, 1024, 4096, device="cuda", dtype=torch.float16, requires_grad=True)
        w, b = (torch.randn(4096, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(2))
        g = torch.randn_like(x)
        return lambda: ff.layer_norm(x, (4096,), w, b).backward(g)

    def attention_step():
        q, k, v = (torch.randn(16, 16, 1024, 64, device="cuda", dtype=torch.float16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn_like(q)
        return lambda: ff.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

    sections, summary = [], []
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for name, make in (("layer_norm", layer_norm_step), ("attention", attention_step)):
        step = make()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / 10 * 1e3
        summary.append(f"{name} {per_step:.2f} ms/step under the profiler")
        sections.append(f"## {name}: fwd+bwd, {per_step:.3f} ms per step (wall, profiled)\n\n"
                        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    (out / "backward-profile.txt").write_text("\n\n".join(sections) + "\n")
    return "; ".join(summary)


def run_benchmarks(deadline: float) -> list[dict]:
    import torch

    rows = []
    for op, dtype, L, shape, make, amount, bwd_factor, unit, modes in _cases():
        for mode in modes:
            for provider in ("fusedformer", "torch"):
                row = dict(op=op, dtype=str(dtype).replace("torch.", ""), L=L, shape=shape, mode=mode,
                           provider=provider, ms="", ms_p20="", ms_p80="", rate="", unit=unit, status="ok")
                rows.append(row)
                if time.monotonic() > deadline:
                    row["status"] = "not run: time budget spent"
                    continue
                try:
                    fn, leaves = make(provider)
                    if mode == "fwd+bwd":
                        grad = torch.randn_like(fn())

                        def step(fn=fn, grad=grad, leaves=leaves):
                            for t in leaves:
                                t.grad = None
                            fn().backward(grad)

                        work, call = amount * (1 + bwd_factor), step
                    else:

                        def call(fn=fn):
                            with torch.no_grad():
                                fn()

                        work = amount
                    ms, p20, p80 = _time(call)
                    rate = work / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
                    row.update(ms=f"{ms:.4f}", ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}", rate=f"{rate:.1f}")
                except Exception as e:  # a failing row is reported, and the others still run
                    first_line = (str(e).splitlines() or [""])[0][:200]
                    row["status"] = f"error: {type(e).__name__}: {first_line}"
                done = row["ms"] or row["status"]
                what = f"{op} {row['dtype']} L={L} {mode} {provider}"
                print(f"[gpu-check] {what}: {done}", file=sys.stderr, flush=True)
                torch.cuda.empty_cache()
    return rows


def _speedups(rows: list[dict]) -> dict[tuple, str]:
    """torch's time / fusedformer's time per (op, dtype, L, mode): above 1, fusedformer is faster."""
    times = {(r["op"], r["dtype"], r["L"], r["mode"], r["provider"]): r["ms"] for r in rows}
    out = {}
    for (op, dtype, L, mode, provider), ms in times.items():
        other = times.get((op, dtype, L, mode, "torch"))
        if provider == "fusedformer" and ms and other:
            out[(op, dtype, L, mode)] = f"{float(other) / float(ms):.2f}x"
    return out


def write_report(out: Path, header: list[str], tests: tuple[bool, str], rows: list[dict]) -> None:
    with open(out / "gpu-check.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    speed = _speedups(rows)
    notes = (
        "Medians of triton.testing.do_bench (20th-80th percentile in brackets). Speedup = torch's time / "
        "fusedformer's (above 1: fusedformer faster). torch: SDPA held to its flash backend, F.layer_norm, "
        "F.gelu(x + bias). Attention rate counts FlashAttention's FLOPs (4·B·H·L·S·E, halved for causal, "
        "x3.5 for fwd+bwd); LayerNorm and GELU count one read of x and one write of y (x2.5 for fwd+bwd: "
        "the backward reads x and dy and writes dx)."
    )
    lines = ["# make gpu-check", "", *[f"- {h}" for h in header], "",
             f"**gpu-marked tests: {'passed' if tests[0] else 'FAILED'}** ({tests[1]}; see tests.log)", "",
             notes, "",
             "| op | dtype | L | shape | mode | fusedformer ms | torch ms | speedup | fusedformer rate | "
             "torch rate | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["op"], r["dtype"], r["L"], r["shape"], r["mode"]), {})[r["provider"]] = r
    for (op, dtype, L, shape, mode), pair in by_key.items():
        ours, theirs = pair.get("fusedformer", {}), pair.get("torch", {})

        def cell(r):
            return f"{r['ms']} [{r['ms_p20']}-{r['ms_p80']}]" if r.get("ms") else "-"

        status = "; ".join(sorted({r["status"] for r in (ours, theirs) if r and r["status"] != "ok"})) or "ok"
        speedup = speed.get((op, dtype, L, mode), "-")
        rates = f"{ours.get('rate') or '-'} {ours.get('unit', '')} | {theirs.get('rate') or '-'}"
        lines.append(f"| {op} | {dtype} | {L} | {shape} | {mode} | {cell(ours)} | {cell(theirs)} | "
                     f"{speedup} | {rates} | {status} |")
    (out / "gpu-check.md").write_text("\n".join(lines) + "\n")


def _commit() -> str:
    """FUSEDFORMER_COMMIT if set (a copied tree whose .git lags behind it), else ``git describe``, which
    says ``-dirty`` when the tree differs from the commit it names."""
    if os.environ.get("FUSEDFORMER_COMMIT"):
        return os.environ["FUSEDFORMER_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu"))
    parser.add_argument("--budget", type=float, default=280.0, help="seconds for everything (default 280)")
    parser.add_argument("--test-budget", type=float, default=150.0, help="seconds for the tests (150)")
    parser.add_argument("--skip-tests", action="store_true", help="timings only")
    args = parser.parse_args(argv)
    start = time.monotonic()

    reason = no_gpu_reason()
    if reason is not None:
        print(f"make gpu-check: cannot run here: {reason}. It needs one CUDA GPU.", file=sys.stderr)
        return 2
    # before fusedformer imports its kernels: a narrow autotuning search for the timings (see _common),
    # and no fallback to the reference path (it would raise, and the row would say so)
    os.environ.setdefault("FUSEDFORMER_TRITON_TUNE", "quick")
    os.environ["FUSEDFORMER_STRICT"] = "1"
    os.environ.pop("FUSEDFORMER_BACKEND", None)

    import torch
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    header = [
        f"GPU: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB); "
        f"host {platform.node()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
        f"fusedformer commit {_commit()}",
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; autotuning: "
        f"FUSEDFORMER_TRITON_TUNE={os.environ['FUSEDFORMER_TRITON_TUNE']}",
    ]
    print("\n".join(header), file=sys.stderr)

    if args.skip_tests:
        tests = (True, "skipped (--skip-tests)")
    else:
        print(f"[gpu-check] pytest -m gpu (at most {args.test_budget:.0f} s)", file=sys.stderr, flush=True)
        tests = run_tests(args.out, args.test_budget)
        print(f"[gpu-check] tests: {tests[1]}", file=sys.stderr)

    try:
        print(f"[gpu-check] profile: {profile_backwards(args.out)}", file=sys.stderr, flush=True)
    except Exception as e:  # the timings still run
        print(f"[gpu-check] profile failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    rows = run_benchmarks(deadline=start + args.budget)
    write_report(args.out, header, tests, rows)
    print((args.out / "gpu-check.md").read_text())
    took = time.monotonic() - start
    print(f"[gpu-check] wrote {args.out}/gpu-check.md, gpu-check.csv, tests.log in {took:.0f} s",
          file=sys.stderr)
    complete = all(r["status"] == "ok" for r in rows)
    return 0 if tests[0] and complete else 1


if __name__ == "__main__":
    sys.exit(main())
