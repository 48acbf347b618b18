"""Transformer layers and stacks, fused: the ``torch.nn`` namesakes' constructors, state_dicts and forwards.

Each class subclasses its ``torch.nn`` namesake: ``__init__`` is torch's (so the parameters, their
initialisation from a given seed and the state_dict keys are torch's), after which the freshly built
``torch.nn`` sub-modules are turned into their fused twins in place (``to_fused_``: a class change; the
parameters stay the very same tensors). ``forward`` is rewritten over the fused sub-modules:

- self- and cross-attention: ``ff.nn.MultiheadAttention`` (``need_weights=False``, so the fused kernel);
- LayerNorm: ``ff.nn.LayerNorm`` (``ff.layer_norm``); every norm that follows a residual add is one fused
  ``ff.add_layer_norm`` (the branch's dropout, the add and the norm in one pass over the rows), for
  both ``norm_first`` settings:
  ``norm_first=False``: ``x = add_norm1(sa(x), x)[0]; x = add_norm2(ff(x), x)[0]``;
  ``norm_first=True``:  ``x = x + sa(norm1(x))`` becomes ``y, x = add_norm2(sa(norm1(x)), x)`` and
  ``x = x + dropout(ff(y))`` (the last add of a block stays an add: no norm follows it in the layer);
- feed-forward with GELU: ``ff.gelu(F.linear(x, W1), bias=b1)``, the bias add fused into the GELU;
  ReLU and other callables: ``activation(F.linear(x, W1, b1))``.

torch's inference fast paths (``torch._transformer_encoder_layer_fwd``, nested tensors) are never taken:
the same code runs in training and in inference, forward and backward through the fused ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fusedformer.nn.activation import GELU
from fusedformer.nn.attention import MultiheadAttention
from fusedformer.nn.linear import Linear
from fusedformer.nn.normalization import LayerNorm, RMSNorm
from fusedformer.ops.add_norm import add_layer_norm, add_rms_norm
from fusedformer.ops.gelu import gelu

__all__ = [
    "FUSED_CLASSES",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "to_fused_",
]


# ---- shared pieces ------------------------------------------------------------------------------


def _gelu_approximate(activation) -> str | None:
    """``"none"``/``"tanh"`` if ``activation`` is a GELU that ``ff.gelu`` computes, else None."""
    if activation is F.gelu:
        return "none"
    if isinstance(activation, nn.GELU):
        return activation.approximate
    return None


def _layer_repr(layer) -> str:
    """The extra_repr of an encoder or decoder layer."""
    return (
        f"d_model={layer.self_attn.embed_dim}, nhead={layer.self_attn.num_heads}, "
        f"dim_feedforward={layer.linear1.out_features}, activation={_activation_name(layer.activation)}, "
        f"norm_first={layer.norm_first}, batch_first={layer.self_attn.batch_first}"
    )


def _activation_name(activation) -> str:
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    approximate = _gelu_approximate(activation)
    if approximate is not None:
        return "gelu" if approximate == "none" else "gelu(tanh)"
    return getattr(activation, "__name__", type(activation).__name__)


def _feed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:  # (*, d_model) -> (*, d_model)
    """``linear2(dropout(activation(linear1(x))))``; a GELU takes linear1's bias into its fused kernel."""
    approximate = _gelu_approximate(layer.activation)
    if approximate is not None:
        linear1 = layer.linear1
        # the engine measured faster for this shape where linear1 is fusedformer's (ff.patch swaps it)
        h = linear1.project(x, bias=False) if isinstance(linear1, Linear) else F.linear(x, linear1.weight)
        bias = layer.linear1.bias
        if bias is not None and bias.dtype != h.dtype:
            bias = bias.to(h.dtype)
        h = gelu(h, approximate, bias=bias)  # (*, dim_feedforward)
    else:
        h = layer.activation(layer.linear1(x))  # (*, dim_feedforward)
    return layer.linear2(layer.dropout(h))  # (*, d_model)


def _add_norm(
    norm: nn.Module,
    dropout: nn.Module,
    branch: torch.Tensor,  # (*, d_model): a sub-block's output, before its dropout
    residual: torch.Tensor,  # (*, d_model)
) -> tuple[torch.Tensor, torch.Tensor]:  # norm(h), h = residual + dropout(branch)
    """``h = residual + dropout(branch); (norm(h), h)``: one fused ``ff.add_layer_norm`` (``add_rms_norm``)
    when ``norm`` is a LayerNorm (RMSNorm) of torch or fusedformer and ``dropout`` an ``nn.Dropout``; the
    dropout's mask is then the fused kernel's (it differs from torch's draw, as attention dropout does).
    Any other norm or dropout module (a user's replacement) is called as it is."""
    if isinstance(dropout, nn.Dropout) and type(norm) in (nn.LayerNorm, LayerNorm, nn.RMSNorm, RMSNorm):
        dtype = torch.promote_types(branch.dtype, residual.dtype)  # as residual + branch promotes
        branch, residual = branch.to(dtype), residual.to(dtype)
        p = dropout.p if dropout.training else 0.0
        weight = norm.weight.to(dtype) if norm.weight is not None else None
        if isinstance(norm, nn.LayerNorm):
            bias = norm.bias.to(dtype) if norm.bias is not None else None
            return add_layer_norm(branch, residual, norm.normalized_shape, weight, bias, norm.eps, p)
        return add_rms_norm(branch, residual, norm.normalized_shape, weight, norm.eps, p)
    h = residual + dropout(branch)
    return norm(h), h


def _is_causal_mask(mask: torch.Tensor | None, is_causal: bool | None, size: int | None) -> bool:
    """torch's ``_detect_is_causal_mask``: the hint if given, else whether ``mask`` is exactly the causal mask.

    Detects the ``(size, size)`` float mask of ``generate_square_subsequent_mask`` (-inf above the diagonal,
    0 elsewhere) and its bool twin (True above the diagonal), as torch does after canonicalising bool masks.
    """
    if is_causal is not None:
        return bool(is_causal)
    if mask is None:
        return False
    sz = size if size is not None else mask.size(-2)
    if tuple(mask.shape) != (sz, sz):
        return False
    above = torch.ones(sz, sz, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool((mask == above).all())
    causal = torch.zeros(sz, sz, dtype=mask.dtype, device=mask.device).masked_fill(above, float("-inf"))
    return bool((mask == causal).all())


def _seq_len(x: torch.Tensor, batch_first: bool) -> int:
    if x.dim() == 2:  # unbatched (S, E)
        return x.shape[0]
    return x.shape[1] if batch_first else x.shape[0]


# ---- layers -------------------------------------------------------------------------------------


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """Self-attention and feed-forward, fused; ``torch.nn.TransformerEncoderLayer``'s interface.

    Args (as torch): ``d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu ("relu", "gelu"
    or a callable), layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device, dtype``.

    Forward: ``src`` ``(S, B, d_model)``, ``(B, S, d_model)`` with ``batch_first``, or ``(S, d_model)``;
    ``src_mask`` ``(S, S)`` or ``(B*nhead, S, S)`` (bool True = masked out, or float added);
    ``src_key_padding_mask`` ``(B, S)`` (bool True = padding, or float added); ``is_causal`` (a hint that
    ``src_mask`` is the causal mask; it may be omitted). Returns ``src``'s shape.

    ``norm_first=False``: ``x = norm1(x + sa(x)); x = norm2(x + ff(x))``;
    ``norm_first=True``:  ``x = x + sa(norm1(x)); x = x + ff(norm2(x))``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            device=device,
            dtype=dtype,
        )
        to_fused_(self)

    def extra_repr(self) -> str:
        return _layer_repr(self)

    def forward(
        self,
        src: torch.Tensor,  # (S, B, D) | (B, S, D) | (S, D)
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:  # src's shape
        x = src
        if self.norm_first:
            # x + sa(norm1(x)) is added and normalised by norm2 in one pass; the last add stays an add
            sa = self._sa_branch(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            y, x = _add_norm(self.norm2, self.dropout1, sa, x)
            x = x + self._ff_block(y)
        else:
            sa = self._sa_branch(x, src_mask, src_key_padding_mask, is_causal=is_causal)
            x, _ = _add_norm(self.norm1, self.dropout1, sa, x)
            x, _ = _add_norm(self.norm2, self.dropout2, _feed_forward(self, x), x)
        return x

    def _sa_branch(self, x, attn_mask, key_padding_mask, is_causal: bool = False) -> torch.Tensor:
        """Self-attention's output before dropout1 (fused into the add + norm that follows)."""
        return self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal: bool = False) -> torch.Tensor:
        return self.dropout1(self._sa_branch(x, attn_mask, key_padding_mask, is_causal=is_causal))

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(_feed_forward(self, x))


class TransformerDecoderLayer(nn.TransformerDecoderLayer):
    """Self-attention, cross-attention and feed-forward, fused; ``torch.nn.TransformerDecoderLayer``'s interface.

    Args (as torch): ``d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu ("relu", "gelu"
    or a callable), layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device, dtype``.

    Forward: ``tgt`` ``(T, B, d_model)`` / ``(B, T, d_model)`` / ``(T, d_model)``; ``memory`` likewise with
    ``S``; ``tgt_mask`` ``(T, T)`` or ``(B*nhead, T, T)``; ``memory_mask`` ``(T, S)`` or ``(B*nhead, T, S)``
    (bool True = masked out, or float added); ``tgt_key_padding_mask`` ``(B, T)``,
    ``memory_key_padding_mask`` ``(B, S)`` (bool True = padding, or float added); ``tgt_is_causal``,
    ``memory_is_causal`` (hints that the masks are causal; they may be omitted). Returns ``tgt``'s shape.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            device=device,
            dtype=dtype,
        )
        to_fused_(self)

    def extra_repr(self) -> str:
        return _layer_repr(self)

    def forward(
        self,
        tgt: torch.Tensor,  # (T, B, D) | (B, T, D) | (T, D)
        memory: torch.Tensor,  # (S, B, D) | (B, S, D) | (S, D)
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:  # tgt's shape
        x = tgt
        if self.norm_first:
            # each x + block(norm(x)) is added and normalised by the next norm in one pass
            sa = self._sa_branch(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            y, x = _add_norm(self.norm2, self.dropout1, sa, x)
            mha = self._mha_branch(y, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            y, x = _add_norm(self.norm3, self.dropout2, mha, x)
            x = x + self._ff_block(y)
        else:
            sa = self._sa_branch(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x, _ = _add_norm(self.norm1, self.dropout1, sa, x)
            mha = self._mha_branch(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x, _ = _add_norm(self.norm2, self.dropout2, mha, x)
            x, _ = _add_norm(self.norm3, self.dropout3, _feed_forward(self, x), x)
        return x

    def _sa_branch(self, x, attn_mask, key_padding_mask, is_causal: bool = False) -> torch.Tensor:
        """Self-attention's output before dropout1 (fused into the add + norm that follows)."""
        return self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            need_weights=False,
        )[0]

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal: bool = False) -> torch.Tensor:
        return self.dropout1(self._sa_branch(x, attn_mask, key_padding_mask, is_causal))

    def _mha_branch(self, x, mem, attn_mask, key_padding_mask, is_causal: bool = False) -> torch.Tensor:
        """Cross-attention's output before dropout2 (fused into the add + norm that follows)."""
        return self.multihead_attn(
            x,
            mem,
            mem,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            need_weights=False,
        )[0]

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal: bool = False) -> torch.Tensor:
        return self.dropout2(self._mha_branch(x, mem, attn_mask, key_padding_mask, is_causal))

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(_feed_forward(self, x))


# ---- stacks -------------------------------------------------------------------------------------


class TransformerEncoder(nn.TransformerEncoder):
    """A stack of ``num_layers`` fused encoder layers (deep copies of ``encoder_layer``), then ``norm``.

    Args (as torch): ``encoder_layer`` (a ``torch.nn`` one is converted; its copies are fused),
    ``num_layers``, ``norm=None`` (a ``torch.nn.LayerNorm`` given here is converted in place to
    ``ff.nn.LayerNorm``, same parameters), ``enable_nested_tensor=True``, ``mask_check=True``.

    Forward: ``src`` ``(S, B, D)`` / ``(B, S, D)`` / ``(S, D)``; ``mask`` ``(S, S)`` or ``(B*nhead, S, S)``;
    ``src_key_padding_mask`` ``(B, S)``; ``is_causal`` (None: detect the causal mask as torch does).
    Returns ``src``'s shape.

    Nested tensors are never used. In the one case where torch's inference fast path would have used them
    (see ``_torch_zeroes_padding``), its output has zeros at the padded positions; this module writes the
    same zeros there, so that the two agree everywhere.
    """

    def __init__(
        self,
        encoder_layer: nn.TransformerEncoderLayer,
        num_layers: int,
        norm: nn.Module | None = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ) -> None:
        super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor, mask_check)
        to_fused_(self)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}"

    def _torch_zeroes_padding(self, src: torch.Tensor, mask, src_key_padding_mask) -> bool:
        """Whether ``torch.nn.TransformerEncoder`` would run this call on nested tensors (zeros at padding).

        NOTE [2026-11-23]: mirrors the conditions of torch 2.13's ``TransformerEncoder.forward``.
        """
        first = self.layers[0]
        if not (
            torch.backends.mha.get_fastpath_enabled()
            and getattr(self, "use_nested_tensor", False)
            and not first.training
            and src.dim() == 3
            and src_key_padding_mask is not None
            and mask is None
            and not torch.is_autocast_enabled()
            and src.device.type in ("cpu", "cuda", "xpu")
        ):
            return False
        params = [p for p in first.parameters()]
        if torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in params)):
            return False
        if getattr(self, "mask_check", True) and torch.compiler.is_compiling():
            return False
        if getattr(self, "mask_check", True):
            valid = ~_padding(src_key_padding_mask)  # (B, S)
            if not bool((valid[:, 1:] <= valid[:, :-1]).all()):  # not left-aligned: torch keeps dense tensors
                return False
        return True

    def forward(
        self,
        src: torch.Tensor,  # (S, B, D) | (B, S, D) | (S, D)
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:  # src's shape
        batch_first = self.layers[0].self_attn.batch_first
        is_causal = _is_causal_mask(mask, is_causal, _seq_len(src, batch_first))
        zero_padding = self._torch_zeroes_padding(src, mask, src_key_padding_mask)
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if zero_padding:
            x = x.masked_fill(_padding(src_key_padding_mask).unsqueeze(-1), 0.0)  # (B, S, D)
        if self.norm is not None:
            x = self.norm(x)
        return x


def _padding(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) bool, True = padding (a float mask pads where it is non-zero, as torch reads it)."""
    return key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0


class TransformerDecoder(nn.TransformerDecoder):
    """A stack of ``num_layers`` fused decoder layers (deep copies of ``decoder_layer``), then ``norm``.

    Args (as torch): ``decoder_layer`` (a ``torch.nn`` one is converted; its copies are fused),
    ``num_layers``, ``norm=None`` (a ``torch.nn.LayerNorm`` is converted in place, same parameters).

    Forward: ``tgt`` ``(T, B, D)`` / ``(B, T, D)`` / ``(T, D)``; ``memory`` likewise with ``S``;
    ``tgt_mask``, ``memory_mask``, ``tgt_key_padding_mask``, ``memory_key_padding_mask`` as in
    ``TransformerDecoderLayer``; ``tgt_is_causal`` (None: detect the causal mask as torch does),
    ``memory_is_causal``. Returns ``tgt``'s shape.
    """

    def __init__(
        self, decoder_layer: nn.TransformerDecoderLayer, num_layers: int, norm: nn.Module | None = None
    ) -> None:
        super().__init__(decoder_layer, num_layers, norm)
        to_fused_(self)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}"

    def forward(
        self,
        tgt: torch.Tensor,  # (T, B, D) | (B, T, D) | (T, D)
        memory: torch.Tensor,  # (S, B, D) | (B, S, D) | (S, D)
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:  # tgt's shape
        batch_first = self.layers[0].self_attn.batch_first
        tgt_is_causal = _is_causal_mask(tgt_mask, tgt_is_causal, _seq_len(tgt, batch_first))
        x = tgt
        for layer in self.layers:
            x = layer(
                x,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=tgt_is_causal,
                memory_is_causal=memory_is_causal,
            )
        if self.norm is not None:
            x = self.norm(x)
        return x


class Transformer(nn.Transformer):
    """Encoder-decoder transformer, fused; ``torch.nn.Transformer``'s interface.

    Args (as torch): ``d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
    dim_feedforward=2048, dropout=0.1, activation=F.relu, custom_encoder=None, custom_decoder=None,
    layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device, dtype``.
    ``custom_encoder`` / ``custom_decoder`` are used as given (not converted).

    Forward (torch's): ``src`` ``(S, B, D)`` / ``(B, S, D)``, ``tgt`` ``(T, B, D)`` / ``(B, T, D)``,
    ``src_mask, tgt_mask, memory_mask, src_key_padding_mask, tgt_key_padding_mask,
    memory_key_padding_mask, src_is_causal, tgt_is_causal, memory_is_causal``. Returns ``tgt``'s shape.
    ``generate_square_subsequent_mask(T)`` is torch's (a float mask that the stacks detect as causal).
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu,
        custom_encoder: nn.Module | None = None,
        custom_decoder: nn.Module | None = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            d_model,
            nhead,
            num_encoder_layers,
            num_decoder_layers,
            dim_feedforward,
            dropout,
            activation,
            custom_encoder,
            custom_decoder,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
            device=device,
            dtype=dtype,
        )
        if custom_encoder is None:
            to_fused_(self.encoder)
        if custom_decoder is None:
            to_fused_(self.decoder)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, nhead={self.nhead}, batch_first={self.batch_first}"


# ---- conversion ---------------------------------------------------------------------------------

#: each ``torch.nn`` class with a fused twin, and the twin
FUSED_CLASSES: dict[type, type] = {
    nn.Linear: Linear,
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    nn.GELU: GELU,
    nn.MultiheadAttention: MultiheadAttention,
    nn.TransformerEncoderLayer: TransformerEncoderLayer,
    nn.TransformerDecoderLayer: TransformerDecoderLayer,
    nn.TransformerEncoder: TransformerEncoder,
    nn.TransformerDecoder: TransformerDecoder,
    nn.Transformer: Transformer,
}


def to_fused_(module: nn.Module, on_swap: Callable[[nn.Module, type], None] | None = None) -> nn.Module:
    """Turns ``module`` and its sub-modules whose type is exactly a ``torch.nn`` class of ``FUSED_CLASSES``
    into the fused twin, in place, and returns ``module``.

    A class change: the fused twins add no state, so parameters, buffers, hooks and object identity stay;
    an optimizer built before keeps working. Subclasses of the torch classes are left alone (they may
    override ``forward``). ``on_swap(module, original_class)`` is called for each change (``ff.patch``
    records them to undo).
    """
    for m in module.modules():
        fused = FUSED_CLASSES.get(type(m))
        if fused is not None:
            original = type(m)
            m.__class__ = fused
            if on_swap is not None:
                on_swap(m, original)
    return module
