"""What the pytest-benchmark suites in ``benchmarks/`` share: sizes and the one function that times a case.

It lives in the package (not in a conftest) so that the suites import it by a name nothing else
shadows. See ``benchmarks/conftest.py`` for how to run them.
"""

from __future__ import annotations

import os
import warnings

import pytest

import fusedformer as ff
from fusedformer.bench.cases import Spec, make_case, unit
from fusedformer.bench.runner import skip_reason

SIZE = os.environ.get("FUSEDFORMER_BENCH_SIZE", "small").strip().lower()
if SIZE not in ("small", "large"):
    raise pytest.UsageError(f"FUSEDFORMER_BENCH_SIZE must be 'small' or 'large', got {SIZE!r}")
LARGE = SIZE == "large"
ROUNDS = 10 if LARGE else 5


def run_benchmark(benchmark, spec: Spec, provider: str, mode: str) -> None:
    """Time ``provider`` on ``spec`` in ``mode``; skip (with the reason) what cannot run here; fail where
    fusedformer would run on the reference path (a fallback is never recorded as a measurement)."""
    case = make_case(spec)
    why = case.unavailable(provider) or skip_reason(case, provider, mode)
    if why:
        pytest.skip(why)
    if case.is_fallback(provider):  # a benchmark of the reference path under fusedformer's name is a failure
        pytest.fail(f"{spec.case} {case.label()}: fusedformer would run on a fallback ({case.backend(provider)})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ff.FallbackWarning)  # and one that shows only when it runs fails too
        u = unit(case, provider, mode)
        kind, count = case.work(mode)
        benchmark.group = f"{spec.case} {spec.dtype} {case.label()} {mode}"
        benchmark.extra_info.update(
            {
                "provider": provider,
                "mode": mode,
                "dtype": spec.dtype,
                "backend": case.backend(provider),
                "fallback": case.is_fallback(provider),
                kind: count,
                **spec.params,
            }
        )

        def setup():
            return (u.setup() if u.setup is not None else None,), {}

        benchmark.pedantic(u.run, setup=setup, rounds=ROUNDS, warmup_rounds=1)
