"""Drop-in fused modules: the constructors, forward arguments and state_dict keys of their ``torch.nn``
namesakes, with forward and backward through fusedformer's fused ops.

    import fusedformer.nn as ffnn
    layer = ffnn.TransformerEncoderLayer(d_model=256, nhead=8, batch_first=True)
    layer.load_state_dict(torch_layer.state_dict())        # and back

Each class subclasses its ``torch.nn`` namesake, so ``isinstance`` checks in user code still hold.
"""

from fusedformer.nn.activation import GELU
from fusedformer.nn.attention import MultiheadAttention
from fusedformer.nn.linear import Linear
from fusedformer.nn.normalization import LayerNorm, RMSNorm
from fusedformer.nn.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "GELU",
    "LayerNorm",
    "Linear",
    "MultiheadAttention",
    "RMSNorm",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
