"""The ops layer: one module per op family (typed wrappers, fake kernels, autograd, public function)."""

from fusedformer.ops import attention, gelu, layer_norm

__all__ = ["attention", "gelu", "layer_norm"]
