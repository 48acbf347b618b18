"""LayerNorm, fused: ``torch.nn.LayerNorm``'s constructor, state_dict and semantics over ``ff.layer_norm``."""

from __future__ import annotations

import torch
from torch import nn

from fusedformer.ops.layer_norm import layer_norm

__all__ = ["LayerNorm"]


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` whose forward and backward run through ``ff.layer_norm`` (one fused pass).

    Args (as ``torch.nn.LayerNorm``):
        normalized_shape: int or shape ``(D1..Dk)`` of the trailing dims normalised over.
        eps: added to the (biased) variance. Default ``1e-5``.
        elementwise_affine: learn ``weight`` (ones) and, with ``bias=True``, ``bias`` (zeros).
        bias: learn a ``bias`` too (with ``elementwise_affine``).
        device, dtype: of the parameters.

    Shape:
        input ``(*, D1..Dk)`` -> output ``(*, D1..Dk)``, input's dtype.

    Parameters, buffers and state_dict keys are ``torch.nn.LayerNorm``'s (``weight``, ``bias``): a torch
    LayerNorm's state_dict loads here and back. Activations of another dtype than the parameters (bf16
    activations with fp32 weights, as under autocast) get the parameters cast to their dtype.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (*, D1..Dk) -> (*, D1..Dk)
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != input.dtype:
            weight = weight.to(input.dtype)
        if bias is not None and bias.dtype != input.dtype:
            bias = bias.to(input.dtype)
        return layer_norm(input, self.normalized_shape, weight, bias, self.eps)

    def explain(self, input: torch.Tensor):
        """Which backend serves this module's call on ``input`` (an ``ff.Explanation``), and why not the others."""
        from fusedformer import explain

        weight = self.weight.to(input.dtype) if self.weight is not None else None
        bias = self.bias.to(input.dtype) if self.bias is not None else None
        return explain(layer_norm, input, self.normalized_shape, weight, bias, self.eps)
