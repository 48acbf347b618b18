"""Whole layers, forward+backward: fusedformer.nn.Transformer{Encoder,Decoder}Layer against torch.nn's
with the same weights (train mode, dropout on). A missing fusedformer.nn class is skipped, by name."""

from __future__ import annotations

import pytest

from fusedformer.bench.cases import Spec
from fusedformer.bench.suites import LARGE, run_benchmark

if LARGE:
    LAYER = {"batch": 8, "length": 1024, "d_model": 512, "nhead": 8, "dim_feedforward": 2048}
else:
    LAYER = {"batch": 2, "length": 64, "d_model": 64, "nhead": 2, "dim_feedforward": 128}


@pytest.mark.parametrize("provider", ["fusedformer", "torch"])
@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_layer(benchmark, layer: str, provider: str) -> None:
    spec = Spec(layer, {**LAYER, "dropout": 0.1, "activation": "gelu"})
    run_benchmark(benchmark, spec, provider, "fwd+bwd")
