"""Attention: fusedformer vs torch's SDPA vs naive (the (L, S) scores materialised), fwd / bwd / fwd+bwd."""

from __future__ import annotations

import pytest

from fusedformer.bench.cases import MODES, PROVIDERS, Spec
from fusedformer.bench.suites import LARGE, run_benchmark

B, H, E = (1, 8, 64) if LARGE else (1, 4, 32)
LENGTHS = (1024, 4096) if LARGE else (128,)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L", LENGTHS, ids=lambda L: f"L{L}")
def test_attention(benchmark, L: int, causal: bool, provider: str, mode: str) -> None:
    spec = Spec("attention", {"B": B, "H": H, "L": L, "S": L, "E": E, "causal": causal})
    run_benchmark(benchmark, spec, provider, mode)
