"""The ops layer: one module per op family (typed wrappers, fake kernels, autograd, public function)."""

from fusedformer.ops import add_norm, attention, gelu, layer_norm, rms_norm

__all__ = ["add_norm", "attention", "gelu", "layer_norm", "rms_norm"]
