"""fusedformer: fused transformer kernels for PyTorch (attention, LayerNorm, GELU; forward and backward).

    import fusedformer as ff
    out = ff.scaled_dot_product_attention(q, k, v, is_causal=True)
    print(ff.explain(ff.scaled_dot_product_attention, q, k, v, is_causal=True))
"""

from __future__ import annotations

from collections.abc import Callable

from fusedformer import backends as _backends
from fusedformer.backends import BackendUnavailableError, Explanation, FallbackWarning
from fusedformer.ops import attention as _attention
from fusedformer.ops import gelu as _gelu
from fusedformer.ops import layer_norm as _layer_norm
from fusedformer.ops.attention import scaled_dot_product_attention
from fusedformer.ops.gelu import gelu
from fusedformer.ops.layer_norm import layer_norm

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Explanation",
    "FallbackWarning",
    "explain",
    "gelu",
    "layer_norm",
    "scaled_dot_product_attention",
]

_REQUESTS = {
    "scaled_dot_product_attention": _attention._request,
    "attention": _attention._request,
    "layer_norm": _layer_norm._request,
    "gelu": _gelu._request,
}


def explain(fn: Callable | str, *args, **kwargs) -> Explanation:
    """Which backend would serve ``fn(*args, **kwargs)``, and why each other backend could not.

    ``fn`` is a public function (``ff.scaled_dot_product_attention``, ``ff.layer_norm``, ``ff.gelu``)
    or its name. Nothing runs; the inputs are checked as the call would check them. ``print()`` the
    result for a readable report, or read ``.backend`` and ``.reasons``.
    """
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", "")
    if name not in _REQUESTS:
        raise ValueError(f"fusedformer.explain: expected one of {sorted(set(_REQUESTS))}, got {fn!r}")
    return _backends.explain_request(_REQUESTS[name](*args, **kwargs))
