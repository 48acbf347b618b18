"""fusedformer: fused transformer kernels for PyTorch (attention, LayerNorm, RMSNorm, residual add + norm,
GELU; forward and backward).

    import fusedformer as ff
    out = ff.scaled_dot_product_attention(q, k, v, is_causal=True)
    print(ff.explain(ff.scaled_dot_product_attention, q, k, v, is_causal=True))
"""

from __future__ import annotations

import sys as _sys

from fusedformer.allocator import cpu_memory_stats, empty_cache
from fusedformer.backends import BackendUnavailableError, Explanation, ExtensionWarning, FallbackWarning
from fusedformer.explanation import explain
from fusedformer.ops.add_norm import add_layer_norm, add_rms_norm
from fusedformer.ops.attention import scaled_dot_product_attention
from fusedformer.ops.gelu import gelu
from fusedformer.ops.linear import linear
from fusedformer.ops.kv_cache import attention_with_kv_cache
from fusedformer.ops.layer_norm import layer_norm
from fusedformer.ops.rms_norm import rms_norm
from fusedformer.ops.varlen import varlen_attention

from fusedformer import nn  # noqa: E402  (the modules call the functions above)
from fusedformer import patching  # noqa: E402
from fusedformer.patching import PatchReport, PatchVerificationError, patch, unpatch  # noqa: E402

# The patching code lives in fusedformer.patching: the function ff.patch would shadow a module of the
# same name. `from fusedformer.patch import patch, unpatch` (the old spelling) still works through this
# alias; `fusedformer.patch` as an attribute is the function.
_sys.modules.setdefault(__name__ + ".patch", patching)

# torch.compile's disk caches key our ops by name only: give them this build's fingerprint, so that a
# graph compiled under another build of fusedformer is never reused (fusedformer/compile_cache.py).
from fusedformer.compile_cache import tag_compile_caches as _tag_compile_caches  # noqa: E402

_tag_compile_caches()

__version__ = "0.1.0"

__all__ = [
    "attention_with_kv_cache",
    "add_layer_norm",
    "add_rms_norm",
    "BackendUnavailableError",
    "cpu_memory_stats",
    "empty_cache",
    "Explanation",
    "ExtensionWarning",
    "FallbackWarning",
    "explain",
    "gelu",
    "linear",
    "layer_norm",
    "nn",
    "patch",
    "patching",
    "PatchReport",
    "PatchVerificationError",
    "rms_norm",
    "scaled_dot_product_attention",
    "unpatch",
    "varlen_attention",
]
