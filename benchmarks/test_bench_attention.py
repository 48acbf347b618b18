"""Attention: fusedformer vs torch's SDPA vs naive (the (L, S) scores materialised), fwd / bwd / fwd+bwd,
in each dtype ``fusedformer-bench`` runs attention in by default."""

from __future__ import annotations

import pytest

from fusedformer.bench.cases import MODES, PROVIDERS, Spec
from fusedformer.bench.runner import Config
from fusedformer.bench.suites import LARGE, run_benchmark

B, H, E = (1, 8, 64) if LARGE else (1, 4, 32)
LENGTHS = (1024, 4096) if LARGE else (128,)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L", LENGTHS, ids=lambda L: f"L{L}")
@pytest.mark.parametrize("dtype", Config.attention_dtypes)
def test_attention(benchmark, dtype: str, L: int, causal: bool, provider: str, mode: str) -> None:
    spec = Spec("attention", {"B": B, "H": H, "L": L, "S": L, "E": E, "causal": causal}, dtype=dtype)
    run_benchmark(benchmark, spec, provider, mode)
