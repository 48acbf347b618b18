"""``ff.explain``: which backend would serve a call, and why the others could not.

Its own module so that ``fusedformer.nn`` imports it directly (no import from the package root).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fusedformer import backends as _backends
from fusedformer.backends import Explanation
from fusedformer.ops import add_norm as _add_norm
from fusedformer.ops import attention as _attention
from fusedformer.ops import gelu as _gelu
from fusedformer.ops import kv_cache as _kv_cache
from fusedformer.ops import layer_norm as _layer_norm
from fusedformer.ops import linear as _linear
from fusedformer.ops import rms_norm as _rms_norm
from fusedformer.ops import varlen as _varlen

__all__ = ["explain"]

_REQUESTS = {
    "scaled_dot_product_attention": _attention._request,
    "attention": _attention._request,
    "attention_with_kv_cache": _kv_cache._request,
    "varlen_attention": _varlen._request,
    "layer_norm": _layer_norm._request,
    "gelu": _gelu._request,
    "rms_norm": _rms_norm._request,
    "add_layer_norm": _add_norm._request_layer,
    "add_rms_norm": _add_norm._request_rms,
}


def explain(fn: Callable | str | torch.nn.Module, *args, **kwargs) -> Explanation:
    """Which backend would serve ``fn(*args, **kwargs)``, and why each other backend could not.

    ``fn`` is a public function (``ff.scaled_dot_product_attention``, ``ff.layer_norm``, ``ff.rms_norm``,
    ``ff.add_layer_norm``, ``ff.add_rms_norm``, ``ff.gelu``), its name, or a fused module
    (``ff.nn.MultiheadAttention``, ``LayerNorm``, ``RMSNorm``, ``GELU``) with its forward's arguments. Nothing runs; the inputs are checked as the call would check them. ``print()`` the
    result for a readable report, or read ``.backend`` and ``.reasons``.
    """
    if isinstance(fn, torch.nn.Module):
        if not (type(fn).__module__.startswith("fusedformer.") and hasattr(fn, "explain")):
            raise ValueError(f"fusedformer.explain: {type(fn).__name__} is not a fusedformer module")
        return fn.explain(*args, **kwargs)
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", "")
    if name == "linear":
        return _explain_linear(*args, **kwargs)
    if name not in _REQUESTS:
        raise ValueError(f"fusedformer.explain: expected one of {sorted({*_REQUESTS, 'linear'})}, got {fn!r}")
    return _backends.explain_request(_REQUESTS[name](*args, **kwargs))


def _explain_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Explanation:
    """``ff.linear``: fusedformer's C++ op (oneDNN's brgemm) or torch's ``F.linear`` ("torch"); it has no Triton
    kernel (on a GPU torch's linear is cuBLAS) and no reference path of its own."""
    why = _linear.why_not_fused(input, weight, bias)
    forced = _backends._forced_backend() is not None
    if why is None:
        stored = "weight read as stored (in, out)" if not weight.is_contiguous() and weight.t().is_contiguous() else ""
        detail = "oneDNN brgemm, K summed in chunks of 128; the backward's products on the same engine"
        if input.dtype == torch.float16:
            detail += "; float16 computed in float32"
        return Explanation("linear", "cpp", {"cpp": [], "torch": []}, forced=forced,
                           detail=detail + (f"; {stored}" if stored else ""))  # fmt: skip
    return Explanation("linear", "torch", {"cpp": [why], "torch": []}, forced=forced, detail="F.linear")
