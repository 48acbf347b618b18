"""GELU, fused: ``torch.nn.GELU``'s constructor and semantics over ``ff.gelu``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusedformer import handover
from fusedformer.backends import Explanation
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

    Small inference calls (grad mode off) go to ``F.gelu`` where that measured faster on this machine,
    at the first call of each size class (``fusedformer.handover``); ``explain`` says which.
    """

    _ff_handover: dict | None = None  # memo of handover decisions by handover.memo_key (set on first use)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (*) -> (*)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # inference: torch's F.gelu where it measured faster (fusedformer.handover); kept short
            key = handover.memo_key(input)
            memo = self._ff_handover
            use = memo.get(key) if memo is not None else None
            if use is None:
                use = handover.module_decides(self, key, input, "gelu", (self.approximate,), self._handover_pair)
            if use:
                return F.gelu(input, approximate=self.approximate)
        return gelu(input, self.approximate)

    def _handover_pair(self):
        approximate = self.approximate
        return (lambda x: gelu(x, approximate), lambda x: F.gelu(x, approximate=approximate))

    def explain(self, input: torch.Tensor) -> Explanation:
        """Which backend serves this module's call on ``input`` (an ``ff.Explanation``), and why not the others."""
        return handover.explained(explain(gelu, input, self.approximate), "gelu", "F.gelu", input, (self.approximate,))
