"""The three ways into fusedformer, side by side: the functions, the modules, and patching a model.

python examples/three_ways_in.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fusedformer as ff
import fusedformer.nn as ffnn
from fusedformer.patching import patch, unpatch

torch.manual_seed(0)
B, L, H, E = 2, 128, 4, 32  # batch, sequence, heads, head dim

# 1. Functions: torch.nn.functional's signatures.
q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
out = ff.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, E)
print(
    "1. functions  max |ff - torch| =",
    (out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item(),
)
print(ff.explain(ff.scaled_dot_product_attention, q, k, v, is_causal=True))

# 2. Modules: torch.nn's constructors, forwards and state_dict keys; weights load both ways.
kwargs = {"d_model": H * E, "nhead": H, "dropout": 0.0, "activation": "gelu", "batch_first": True}
torch_layer = nn.TransformerEncoderLayer(**kwargs)
fused_layer = ffnn.TransformerEncoderLayer(**kwargs)
fused_layer.load_state_dict(torch_layer.state_dict())
x = torch.randn(B, L, H * E)
causal = nn.Transformer.generate_square_subsequent_mask(L)
diff = fused_layer(x, src_mask=causal, is_causal=True) - torch_layer(x, src_mask=causal, is_causal=True)
print("2. modules    max |ff - torch| =", diff.abs().max().item())

# 3. Patching: swap fused modules into a model you already have, in place; undo with unpatch.
model = nn.Sequential(
    nn.TransformerEncoder(torch_layer, num_layers=2, enable_nested_tensor=False), nn.LayerNorm(H * E)
)
before = model(x)
report = patch(model, verify=True, sample_inputs=(x,))
print("3. patch      max |after - before| =", (model(x) - before).abs().max().item())
print(report)
unpatch(model)
