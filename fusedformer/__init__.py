"""fusedformer: fused transformer kernels for PyTorch (attention, LayerNorm, GELU; forward and backward).

    import fusedformer as ff
    out = ff.scaled_dot_product_attention(q, k, v, is_causal=True)
    print(ff.explain(ff.scaled_dot_product_attention, q, k, v, is_causal=True))
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fusedformer import backends as _backends
from fusedformer.backends import BackendUnavailableError, Explanation, FallbackWarning
from fusedformer.ops import attention as _attention
from fusedformer.ops import gelu as _gelu
from fusedformer.ops import layer_norm as _layer_norm
from fusedformer.ops import varlen as _varlen
from fusedformer.ops.attention import scaled_dot_product_attention
from fusedformer.ops.gelu import gelu
from fusedformer.ops.layer_norm import layer_norm
from fusedformer.ops.varlen import varlen_attention

from fusedformer import nn  # noqa: E402  (the modules call the functions above)
from fusedformer.patch import PatchReport, PatchVerificationError, patch, unpatch  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Explanation",
    "FallbackWarning",
    "explain",
    "gelu",
    "layer_norm",
    "nn",
    "patch",
    "PatchReport",
    "PatchVerificationError",
    "scaled_dot_product_attention",
    "unpatch",
    "varlen_attention",
]

_REQUESTS = {
    "scaled_dot_product_attention": _attention._request,
    "attention": _attention._request,
    "varlen_attention": _varlen._request,
    "layer_norm": _layer_norm._request,
    "gelu": _gelu._request,
}


def explain(fn: Callable | str | torch.nn.Module, *args, **kwargs) -> Explanation:
    """Which backend would serve ``fn(*args, **kwargs)``, and why each other backend could not.

    ``fn`` is a public function (``ff.scaled_dot_product_attention``, ``ff.varlen_attention``,
    ``ff.layer_norm``, ``ff.gelu``), its name, or a fused module (``ff.nn.MultiheadAttention``,
    ``LayerNorm``, ``GELU``) with its forward's arguments. Nothing runs; the inputs are checked as the call would check them. ``print()`` the
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
