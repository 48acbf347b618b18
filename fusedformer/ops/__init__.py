"""The ops layer: one module per op family (typed wrappers, fake kernels, autograd, public function)."""

from fusedformer.ops import add_norm, attention, gelu, kv_cache, layer_norm, rms_norm, sharding, varlen

__all__ = ["add_norm", "attention", "gelu", "kv_cache", "layer_norm", "rms_norm", "sharding", "varlen"]

# every family above recorded its DTensor sharding rules: register them now if torch.distributed.tensor
# is loaded, else as soon as it is
sharding._install_when_ready()
