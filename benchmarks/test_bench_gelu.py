"""bias + GELU: fusedformer's fused bias vs F.gelu(x + bias) vs the reference, fwd / bwd / fwd+bwd."""

from __future__ import annotations

import pytest

from fusedformer.bench.cases import MODES, PROVIDERS, Spec
from fusedformer.bench.suites import LARGE, run_benchmark

SHAPES = ((8192, 1024), (8192, 4096)) if LARGE else ((256, 512),)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gelu(benchmark, shape: tuple[int, int], approximate: str, provider: str, mode: str) -> None:
    rows, width = shape
    spec = Spec("gelu", {"rows": rows, "width": width, "approximate": approximate})
    run_benchmark(benchmark, spec, provider, mode)
