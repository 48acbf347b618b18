"""Varlen attention: fusedformer on packed sequences vs torch's SDPA on the padded batch with its mask vs
a Python loop of torch's SDPA over the sequences, fwd / bwd / fwd+bwd."""

from __future__ import annotations

import pytest

from fusedformer.bench.cases import MODES, Spec, VarlenCase, varlen_lengths
from fusedformer.bench.suites import LARGE, run_benchmark

# issue 9's target: 8 sequences of 64..1024 tokens, H=8, E=64; small: 4 of 16..128, H=2, E=32
LENGTHS, H, E = (varlen_lengths(8, 64, 1024), 8, 64) if LARGE else (varlen_lengths(4, 16, 128), 2, 32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", VarlenCase.providers)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(benchmark, causal: bool, provider: str, mode: str) -> None:
    spec = Spec("varlen", {"lengths": LENGTHS, "H": H, "E": E, "causal": causal})
    run_benchmark(benchmark, spec, provider, mode)
