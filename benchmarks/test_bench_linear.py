"""Linear layers: ``ff.linear`` (oneDNN's brgemm) vs ``F.linear`` (MKL's sgemm), fwd / bwd / fwd+bwd, float32 CPU."""

from __future__ import annotations

import pytest

from fusedformer.bench.cases import MODES, LinearCase, Spec
from fusedformer.bench.suites import LARGE, run_benchmark

# (rows, in, out): all-MiniLM-L6-v2's feed-forward at 32 x 122 tokens; small: one sentence's and a tile's worth
SHAPES = ((3904, 384, 1536), (3904, 1536, 384)) if LARGE else ((122, 384, 1536), (256, 128, 256))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", LinearCase.providers)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear(benchmark, shape: tuple[int, int, int], provider: str, mode: str) -> None:
    rows, fin, fout = shape
    run_benchmark(benchmark, Spec("linear", {"rows": rows, "in_features": fin, "out_features": fout}), provider, mode)
