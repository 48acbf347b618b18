"""LayerNorm and RMSNorm, fused: the constructors, state_dicts and semantics of ``torch.nn.LayerNorm`` and
``torch.nn.RMSNorm`` over ``ff.layer_norm`` and ``ff.rms_norm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusedformer import handover
from fusedformer.backends import Explanation
from fusedformer.explanation import explain
from fusedformer.ops.layer_norm import layer_norm
from fusedformer.ops.rms_norm import rms_norm

__all__ = ["LayerNorm", "RMSNorm"]


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A parameter in the activations' dtype (bf16 activations with fp32 weights, as under autocast)."""
    return t.to(dtype) if t is not None and t.dtype != dtype else t


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

    Small inference calls (grad mode off) go to ``F.layer_norm`` where that measured faster on this
    machine, at the first call of each size class (``fusedformer.handover``); ``explain`` says which.
    """

    _ff_handover: dict | None = None  # memo of handover decisions by handover.memo_key (set on first use)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (*, D1..Dk) -> (*, D1..Dk)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # inference: torch's F.layer_norm where it measured faster (fusedformer.handover). This path
            # is kept short: a small call's whole budget is a few microseconds
            key = handover.memo_key(input)
            memo = self._ff_handover
            use = memo.get(key) if memo is not None else None
            if use is None:
                use = handover.module_decides(
                    self, key, input, "layer_norm", self._handover_options(), self._handover_pair,
                    (self.weight, self.bias),
                )
            if use:
                return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(
            input, self.normalized_shape, _as(self.weight, input.dtype), _as(self.bias, input.dtype), self.eps
        )

    def _handover_options(self) -> tuple:
        return (self.normalized_shape, self.weight is not None, self.bias is not None)

    def _handover_pair(self):
        shape, weight, bias, eps = self.normalized_shape, self.weight, self.bias, self.eps
        return (lambda x: layer_norm(x, shape, weight, bias, eps), lambda x: F.layer_norm(x, shape, weight, bias, eps))

    def _apply(self, fn, recurse=True):
        handover.forget(self)  # parameters moved or cast: decide again
        return super()._apply(fn, recurse)

    def explain(self, input: torch.Tensor) -> Explanation:
        """Which backend serves this module's call on ``input`` (an ``ff.Explanation``), and why not the others."""
        weight, bias = _as(self.weight, input.dtype), _as(self.bias, input.dtype)
        fused = explain(layer_norm, input, self.normalized_shape, weight, bias, self.eps)
        return handover.explained(fused, "layer_norm", "F.layer_norm", input, self._handover_options())


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` whose forward and backward run through ``ff.rms_norm`` (one fused pass).

    Args (as ``torch.nn.RMSNorm``):
        normalized_shape: int or shape ``(D1..Dk)`` of the trailing dims normalised over.
        eps: added to the mean of squares; None (the default) means ``torch.finfo(input.dtype).eps``.
        elementwise_affine: learn ``weight`` (ones).
        device, dtype: of the parameters.

    Shape:
        input ``(*, D1..Dk)`` -> output ``(*, D1..Dk)``, input's dtype.

    Parameters and state_dict keys are ``torch.nn.RMSNorm``'s (``weight``). A weight of another dtype than
    the activations is cast to theirs.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (*, D1..Dk) -> (*, D1..Dk)
        return rms_norm(input, self.normalized_shape, _as(self.weight, input.dtype), self.eps)

    def explain(self, input: torch.Tensor):
        """Which backend serves this module's call on ``input`` (an ``ff.Explanation``), and why not the others."""
        return explain(rms_norm, input, self.normalized_shape, _as(self.weight, input.dtype), self.eps)
