"""MultiheadAttention, fused: ``torch.nn.MultiheadAttention``'s constructor, state_dict and forward.

The in-projection and out-projection are ``F.linear``; the attention itself is one call of
``ff.scaled_dot_product_attention`` on ``(B, H, L, hd)`` heads. ``nn.MultiheadAttention``'s masks (bool
True = *masked out*, float = added) become one SDPA mask (bool True = *takes part*): a key-padding mask
becomes a ``(B, 1, 1, S)`` mask, never an ``(L, S)`` one per batch entry. Attention dropout (``dropout >
0`` in training) is fused on the CPU and on Triton (its mask is drawn by the kernels' own counter-based
generator, the same on both, not by torch's dropout). ``need_weights=True`` (``nn.MultiheadAttention``'s default)
runs on the reference path (plain PyTorch), with a one-time ``FallbackWarning`` and a reason in
``explain``: the attention probabilities are returned, and the fused kernels never materialise them;
with dropout, that path draws torch's own dropout mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fusedformer import backends
from fusedformer.reference import causal_mask
from fusedformer.backends import BACKENDS, Explanation
from fusedformer.explanation import explain as ff_explain
from fusedformer.ops.attention import scaled_dot_product_attention

__all__ = ["MultiheadAttention"]

_NEED_WEIGHTS_REASON = (
    "need_weights=True returns the attention probabilities, which the fused kernels never materialise "
    "(pass need_weights=False for the fused kernel)"
)


# ---- masks --------------------------------------------------------------------------------------


def _check_mask_dtype(mask: torch.Tensor | None, name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"MultiheadAttention: expected {name} to be bool or floating point, got {mask.dtype}")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An SDPA mask -> additive: bool (True = takes part) becomes 0 / -inf; a float mask is cast to ``dtype``."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def sdpa_mask_from_mha(
    attn_mask: torch.Tensor | None,  # (L, S) or (B*H, L, S); bool True = masked out, or float added
    key_padding_mask: torch.Tensor | None,  # (B, S); bool True = padding, or float added
    batch: int,
    num_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:  # broadcastable to (B, H, L, S); bool True = takes part, or float added
    """``nn.MultiheadAttention``'s two masks -> one ``ff.scaled_dot_product_attention`` mask.

    The key-padding mask alone becomes a ``(B, 1, 1, S)`` view; only when both masks are given are they
    combined, into ``(B, 1, L, S)`` (or ``(B, H, L, S)`` for a per-head ``attn_mask``). Two bool masks stay
    bool; a float one makes the result additive (bool entries become 0 / -inf) in ``dtype``.
    """
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, num_heads, *attn_mask.shape[-2:])  # (B, H, L, S)
        mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(batch, 1, 1, key_padding_mask.shape[-1])  # (B, 1, 1, S)
        kpm = ~kpm if kpm.dtype == torch.bool else kpm.to(dtype)
        if mask is None:
            mask = kpm
        elif mask.dtype == torch.bool and kpm.dtype == torch.bool:
            mask = mask & kpm  # (B, 1 or H, L, S)
        else:
            mask = _additive(mask, dtype) + _additive(kpm, dtype)  # (B, 1 or H, L, S)
    return mask


def attention_with_weights(
    q: torch.Tensor,  # (B, H, L, E)
    k: torch.Tensor,  # (B, H, S, E)
    v: torch.Tensor,  # (B, H, S, Ev)
    mask: torch.Tensor | None,  # broadcastable to (B, H, L, S); bool True = takes part, or float added
    dropout_p: float,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # out (B, H, L, Ev), probabilities (B, H, L, S)
    """The reference path, for callers that need the attention probabilities (``need_weights=True``).

    Computed in the inputs' dtype the way ``F.multi_head_attention_forward`` does (query scaled first).
    Probabilities are returned after dropout, as torch returns them. A query row whose keys are all masked
    out gives probabilities 0 and output 0 (torch's ``need_weights`` path gives NaN there).
    """
    L, S = q.shape[-2], k.shape[-2]
    scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)  # (B, H, L, S)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(L, S, q.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    # rows with no key: softmax would give NaN (and NaN gradients); zero them before and after
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (B, H, L, 1)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)  # (B, H, L, S)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return probs @ v, probs  # (B, H, L, Ev), (B, H, L, S)


# ---- the module ---------------------------------------------------------------------------------


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention runs through ``ff.scaled_dot_product_attention``.

    Args (as ``torch.nn.MultiheadAttention``):
        embed_dim: ``E``, the model width; ``num_heads`` must divide it (head dim ``hd = E // num_heads``).
        num_heads: ``H``.
        dropout: attention dropout on the probabilities, in training (fused on the CPU, see the module doc).
        bias: in- and out-projection biases.
        add_bias_kv: learn one extra key and value (``bias_k``, ``bias_v``: ``(1, 1, E)``) appended to the sequence.
        add_zero_attn: append one all-zero key and value per head.
        kdim, vdim: the widths of ``key`` and ``value`` (default ``E``); separate projection weights if they differ.
        batch_first: ``(B, L, E)`` inputs and outputs instead of ``(L, B, E)``.
        device, dtype: of the parameters.

    Forward (as ``torch.nn.MultiheadAttention.forward``):
        query: ``(L, B, E)``, ``(B, L, E)`` with ``batch_first``, or ``(L, E)`` unbatched.
        key: ``(S, B, kdim)`` / ``(B, S, kdim)`` / ``(S, kdim)``.
        value: ``(S, B, vdim)`` / ``(B, S, vdim)`` / ``(S, vdim)``.
        key_padding_mask: ``(B, S)`` (``(S,)`` unbatched); bool True = padding, ignored; or float, added.
        need_weights: also return the attention weights (reference path). Default ``True``, as in torch:
            pass ``need_weights=False`` for the fused kernel.
        attn_mask: ``(L, S)`` or ``(B*H, L, S)``; bool True = *not* allowed to attend (the opposite of SDPA's
            convention), or float, added to the scores.
        average_attn_weights: average the returned weights over heads.
        is_causal: query ``i`` attends to keys ``j <= i`` (top-left aligned). As in torch it is a hint that
            ``attn_mask`` is the causal mask, and ``attn_mask`` is then not read; unlike torch, ``attn_mask``
            may be omitted.

    Returns ``(attn_output, attn_weights)``: ``attn_output`` shaped as ``query`` with width ``E``;
    ``attn_weights`` ``(B, L, S)`` (averaged) or ``(B, H, L, S)``, without ``B`` unbatched, or None
    when ``need_weights=False``.

    Parameters and state_dict keys are torch's (``in_proj_weight``/``q_proj_weight``..., ``in_proj_bias``,
    ``out_proj.weight``, ``out_proj.bias``, ``bias_k``, ``bias_v``), and so is the initialisation: built after
    the same ``torch.manual_seed``, the two modules hold the same weights.
    """

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        s += f", dropout={self.dropout}, bias={self.in_proj_bias is not None}, batch_first={self.batch_first}"
        if self.bias_k is not None:
            s += ", add_bias_kv=True"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        return s

    # -- pieces -------------------------------------------------------------------------------

    def _in_projection(
        self,
        query: torch.Tensor,  # (B, L, E)
        key: torch.Tensor,  # (B, S, kdim)
        value: torch.Tensor,  # (B, S, vdim)
        self_attention: bool,
        key_is_value: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q (B, L, E), k (B, S, E), v (B, S, E)
        """The q, k, v projections, packed as torch packs them (one GEMM for self-attention)."""
        E, b = self.embed_dim, self.in_proj_bias
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)
            return q, k, v
        w = self.in_proj_weight  # (3E, E)
        if hasattr(w, "placements"):
            # a DTensor (tensor parallel, see nn/parallel.py's HeadParallel): project q, k, v each through its
            # own (E, E) view, so each stays sharded by heads; one packed GEMM would mix them in the shards
            w3 = w.unflatten(0, (3, E))  # (3, E, E)
            b3 = b.unflatten(0, (3, E)) if b is not None else (None, None, None)  # (3, E)
            return F.linear(query, w3[0], b3[0]), F.linear(key, w3[1], b3[1]), F.linear(value, w3[2], b3[2])
        if self_attention:
            qkv = F.linear(query, w, b)  # (B, L, 3E)
            q, k, v = qkv.chunk(3, dim=-1)  # 3 x (B, L, E)
            return q, k, v
        if key_is_value:
            w_q, w_kv = w.split([E, 2 * E])
            b_q, b_kv = b.split([E, 2 * E]) if b is not None else (None, None)
            k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)  # 2 x (B, S, E)
            return F.linear(query, w_q, b_q), k, v
        w_q, w_k, w_v = w.chunk(3)
        b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Raises on shapes ``nn.MultiheadAttention`` would reject; returns whether the input is batched."""
        name = "MultiheadAttention"
        if query.dim() not in (2, 3):
            raise ValueError(
                f"{name}: expected query of 2 (unbatched) or 3 dims, got shape {tuple(query.shape)}"
            )
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"{name}: expected key and value with query's {query.dim()} dims, got shapes "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        if query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"{name}: expected query's last dim to be embed_dim={self.embed_dim}, got {query.shape[-1]}"
            )
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"{name}: expected key's last dim {self.kdim} and value's {self.vdim}, got {key.shape[-1]} and "
                f"{value.shape[-1]}"
            )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"{name}: key {tuple(key.shape)} and value {tuple(value.shape)} differ in length or batch"
            )
        _check_mask_dtype(attn_mask, "attn_mask")
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        b_dim = 0 if self.batch_first else 1
        B = query.shape[b_dim] if batched else 1
        L, S = (query.shape[b_dim ^ 1], key.shape[b_dim ^ 1]) if batched else (query.shape[0], key.shape[0])
        if batched and key.shape[b_dim] != B:
            raise ValueError(f"{name}: query has batch {B} and key {key.shape[b_dim]}")
        if key_padding_mask is not None:
            want = (B, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(
                    f"{name}: expected key_padding_mask of shape {want}, got {tuple(key_padding_mask.shape)}"
                )
        if attn_mask is not None and tuple(attn_mask.shape) not in ((L, S), (B * self.num_heads, L, S)):
            raise ValueError(
                f"{name}: expected attn_mask of shape {(L, S)} or {(B * self.num_heads, L, S)}, "
                f"got {tuple(attn_mask.shape)}"
            )
        return batched

    def _prepare(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """Projected heads and one SDPA mask: everything ``forward`` and ``explain`` share.

        Returns q ``(B, H, L, hd)``, k ``(B, H, S', hd)``, v ``(B, H, S', hd)`` (``S' = S`` plus one for
        ``add_bias_kv`` and one for ``add_zero_attn``), the mask (broadcastable to ``(B, H, L, S')``) or None,
        is_causal, and whether the input was batched.
        """
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        self_attention = query is key and key is value
        key_is_value = key is value
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, _ = query.shape
        S = key.shape[1]
        H, hd = self.num_heads, self.head_dim

        if is_causal:
            if self.bias_k is not None or self.add_zero_attn:
                # the appended keys take part for every query, as in torch's masked path: make the mask real
                attn_mask, is_causal = ~causal_mask(L, S, query.device), False
            else:
                # a hint that attn_mask is the causal mask, which is_causal applies without any buffer
                attn_mask = None

        q, k, v = self._in_projection(query, key, value, self_attention, key_is_value)  # (B, L|S, E)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, -1).to(k.dtype)], dim=1)  # (B, S+1, E)
            v = torch.cat([v, self.bias_v.expand(B, 1, -1).to(v.dtype)], dim=1)  # (B, S+1, E)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        q = q.unflatten(-1, (H, hd)).transpose(1, 2)  # (B, H, L, hd)
        k = k.unflatten(-1, (H, hd)).transpose(1, 2)  # (B, H, S', hd)
        v = v.unflatten(-1, (H, hd)).transpose(1, 2)  # (B, H, S', hd)
        if self.add_zero_attn:
            zeros = k.new_zeros(B, H, 1, hd)
            k = torch.cat([k, zeros], dim=2)  # (B, H, S'+1, hd)
            v = torch.cat([v, zeros], dim=2)  # (B, H, S'+1, hd)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        mask = sdpa_mask_from_mha(attn_mask, key_padding_mask, B, H, q.dtype)
        return q, k, v, mask, is_causal, batched

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v, mask, is_causal, batched = self._prepare(
            query, key, value, key_padding_mask, attn_mask, is_causal
        )
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            backends.report_fallback("MultiheadAttention(need_weights=True)", _NEED_WEIGHTS_REASON)
            # y (B, H, L, hd), weights (B, H, L, S')
            y, weights = attention_with_weights(q, k, v, mask, dropout_p, is_causal)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (B, L, S')
            if not batched:
                weights = weights.squeeze(0)
        else:
            y = scaled_dot_product_attention(  # (B, H, L, hd)
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
            )
            weights = None
        y = y.transpose(1, 2).flatten(2)  # (B, L, E)
        y = F.linear(y, self.out_proj.weight, self.out_proj.bias)  # (B, L, E)
        if not batched:
            y = y.squeeze(0)  # (L, E)
        elif not self.batch_first:
            y = y.transpose(0, 1)  # (L, B, E)
        return y, weights

    def explain(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Explanation:
        """Which backend would serve ``forward`` with these arguments, and why the others could not.

        Takes ``forward``'s arguments; runs the projections (no attention) to build the attention call.
        ``need_weights=True`` names the reason it runs on the reference path.
        """
        with torch.no_grad():
            q, k, v, mask, causal, _ = self._prepare(
                query, key, value, key_padding_mask, attn_mask, is_causal
            )
        dropout_p = self.dropout if self.training else 0.0
        e = ff_explain(
            scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal
        )
        if not need_weights:
            return Explanation("MultiheadAttention", e.backend, e.reasons, e.forced)
        reasons = {
            name: (e.reasons.get(name, []) + [_NEED_WEIGHTS_REASON]) if name != "reference" else []
            for name in BACKENDS
        }
        return Explanation("MultiheadAttention(need_weights=True)", "reference", reasons, e.forced)
