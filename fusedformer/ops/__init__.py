"""The ops layer: one module per op family (typed wrappers, fake kernels, autograd, public function)."""

from fusedformer.ops import attention, gelu, layer_norm, varlen

__all__ = ["attention", "gelu", "layer_norm", "varlen"]
