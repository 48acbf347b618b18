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
    if name not in _REQUESTS:
        raise ValueError(f"fusedformer.explain: expected one of {sorted(set(_REQUESTS))}, got {fn!r}")
    return _backends.explain_request(_REQUESTS[name](*args, **kwargs))
