"""RMSNorm (weight): fusedformer vs F.rms_norm vs the reference, fwd / bwd / fwd+bwd."""

from __future__ import annotations

import pytest

from fusedformer.bench.cases import MODES, PROVIDERS, Spec
from fusedformer.bench.suites import LARGE, run_benchmark

SHAPES = ((8192, 1024), (8192, 4096)) if LARGE else ((256, 512),)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rms_norm(benchmark, shape: tuple[int, int], provider: str, mode: str) -> None:
    rows, width = shape
    run_benchmark(benchmark, Spec("rms_norm", {"rows": rows, "width": width}), provider, mode)
