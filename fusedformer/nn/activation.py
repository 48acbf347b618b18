"""GELU, fused: ``torch.nn.GELU``'s constructor and semantics over ``ff.gelu``."""

from __future__ import annotations

import torch
from torch import nn

from fusedformer.explanation import explain
from fusedformer.ops.gelu import gelu

__all__ = ["GELU"]


class GELU(nn.GELU):
    """``torch.nn.GELU`` whose forward and backward run through ``ff.gelu``.

    Args:
        approximate: ``"none"`` for the exact ``x·Φ(x)`` (erf), ``"tanh"`` for the tanh approximation.

    Shape:
        input ``(*)`` -> output ``(*)``, input's dtype.

    To fuse a preceding bias add as well, call ``ff.gelu(F.linear(x, W), bias=b)`` instead of
    ``GELU()(F.linear(x, W, b))``; the fused transformer layers do that in their feed-forward block.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (*) -> (*)
        return gelu(input, self.approximate)

    def explain(self, input: torch.Tensor):
        """Which backend serves this module's call on ``input`` (an ``ff.Explanation``), and why not the others."""
        return explain(gelu, input, self.approximate)
