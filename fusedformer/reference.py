"""Plain-PyTorch references: the ground truth of the tests and the ``naive`` baseline of the benchmarks.

They compute in float32 (float64 for float64 inputs; ``upcast=False`` keeps a half dtype, which the
tests use as "PyTorch in the same dtype") and return the input's dtype. Attention here is the naive
O(L·S·E)-time, O(L·S)-memory algorithm: it materialises the (..., L, S) score matrix on purpose.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "scaled_dot_product_attention",
    "attention_with_kv_cache",
    "varlen_attention",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "gelu",
    "compute_dtype",
]


def compute_dtype(dtype: torch.dtype, upcast: bool = True) -> torch.dtype:
    """float64 stays float64; everything else computes in float32 (or as is, with ``upcast=False``)."""
    if dtype == torch.float64:
        return torch.float64
    return torch.float32 if upcast else dtype


def causal_mask(L: int, S: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(L, S) bool, True = take part; aligned top-left as in torch: query i sees keys j <= i.

    For L=3, S=5::

        1 0 0 0 0
        1 1 0 0 0
        1 1 1 0 0
    """
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def scaled_dot_product_attention(
    query: torch.Tensor,  # (..., Hq, L, E)
    key: torch.Tensor,  # (..., Hk, S, E)
    value: torch.Tensor,  # (..., Hk, S, Ev)
    attn_mask: torch.Tensor | None = None,  # broadcastable to (..., Hq, L, S)
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    upcast: bool = True,
    dropout_mask: torch.Tensor | None = None,  # bool, broadcastable to (..., Hq, L, S); True = kept
) -> torch.Tensor:  # (..., Hq, L, Ev)
    """Naive attention, ``F.scaled_dot_product_attention``'s semantics.

    A bool ``attn_mask`` marks with True the keys that take part; a float one is added to the scores.
    ``is_causal`` and ``attn_mask`` may be given together (both apply). A query row whose keys are all
    masked out (-inf) gives 0, as torch's math backend does, never NaN. With ``dropout_p > 0``, dropout
    draws from torch's RNG (``F.dropout``), or applies ``dropout_mask`` when given (the fused kernels'
    mask, from ``fusedformer.ops.attention.attention_dropout_mask``): ``probs * mask / (1 - dropout_p)``.
    """
    dtype = compute_dtype(query.dtype, upcast)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    L, S = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., Hq, L, S): the O(L·S) buffer
    if is_causal:
        scores = scores.masked_fill(~causal_mask(L, S, q.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(dtype)
    probs = torch.softmax(scores, dim=-1)
    # rows with no key to attend to: softmax gives NaN, the contract says 0
    probs = probs.masked_fill((scores == float("-inf")).all(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0 and dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    return (probs @ v).to(query.dtype)


def attention_with_kv_cache(
    query: torch.Tensor,  # (B, Hq, L, E)
    k_cache: torch.Tensor,  # (B, Hk, S_max, E), written in place when key is given
    v_cache: torch.Tensor,  # (B, Hk, S_max, Ev), written in place when value is given
    key: torch.Tensor | None = None,  # (B, Hk, L, E)
    value: torch.Tensor | None = None,  # (B, Hk, L, Ev)
    cache_seqlens: torch.Tensor | None = None,  # (B,) int: entries per sequence before the call
    is_causal: bool = True,
    scale: float | None = None,
    *,
    upcast: bool = True,
) -> torch.Tensor:  # (B, Hq, L, Ev)
    """Attention against a KV cache, sequence by sequence (``ff.attention_with_kv_cache``'s contract).

    Appends ``key``/``value`` at ``cache_seqlens[b]``, then query ``i`` of sequence ``b`` attends to the
    first ``n_b`` cache entries (``n_b = cache_seqlens[b] (+ L)``), causal aligned bottom-right: keys
    ``j <= n_b - L + i``. A row with no key gives 0. Checks nothing: the fused op's checks are the contract.
    """
    B, Hq, L, _ = query.shape
    S_max = k_cache.shape[2]
    before = [S_max] * B if cache_seqlens is None else [int(n) for n in cache_seqlens.reshape(-1).tolist()]
    if key is not None:
        for b in range(B):
            k_cache[b, :, before[b]:before[b] + L] = key[b]
            v_cache[b, :, before[b]:before[b] + L] = value[b]
    outs = []
    for b in range(B):
        n = before[b] + (L if key is not None else 0)
        mask = None
        if is_causal:
            i = torch.arange(L, device=query.device)[:, None]
            j = torch.arange(n, device=query.device)[None, :]
            mask = j <= n - L + i
        outs.append(
            scaled_dot_product_attention(
                query[b], k_cache[b, :, :n], v_cache[b, :, :n], mask, scale=scale, enable_gqa=True, upcast=upcast
            )
        )
    return torch.stack(outs) if outs else query.new_empty((0, Hq, L, v_cache.shape[-1]))


def varlen_attention(
    query: torch.Tensor,  # (total_q, Hq, E)
    key: torch.Tensor,  # (total_k, Hk, E)
    value: torch.Tensor,  # (total_k, Hk, Ev)
    cu_seqlens_q: torch.Tensor,  # (B + 1,) int
    cu_seqlens_k: torch.Tensor,  # (B + 1,) int
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    upcast: bool = True,
    dropout_mask: torch.Tensor | None = None,  # bool (B, Hq, >= max L, >= max S); True = kept
) -> torch.Tensor:  # (total_q, Hq, Ev)
    """Packed sequences, one naive attention per sequence: sequence ``b``'s queries
    ``[cu_seqlens_q[b], cu_seqlens_q[b + 1])`` attend to its keys ``[cu_seqlens_k[b], cu_seqlens_k[b + 1])``,
    ``is_causal`` top-left within the sequence; grouped-query when ``Hq`` is a multiple of ``Hk``.
    ``dropout_mask[b, :, :L_b, :S_b]`` is sequence b's mask when given (the fused kernels' mask)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for b in range(len(cq) - 1):
        q = query[cq[b]:cq[b + 1]].transpose(0, 1)  # (Hq, L, E)
        k = key[ck[b]:ck[b + 1]].transpose(0, 1)  # (Hk, S, E)
        v = value[ck[b]:ck[b + 1]].transpose(0, 1)  # (Hk, S, Ev)
        mask = None
        if dropout_mask is not None:
            mask = dropout_mask[b, :, : q.shape[1], : k.shape[1]]
        out = scaled_dot_product_attention(
            q, k, v, None, dropout_p, is_causal, scale, enable_gqa=True, upcast=upcast, dropout_mask=mask
        )
        outs.append(out.transpose(0, 1))  # (L, Hq, Ev)
    if not outs:
        return query.new_empty((0, query.shape[1], value.shape[-1]))
    return torch.cat(outs, dim=0)


def layer_norm(
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,  # (D1..Dk)
    bias: torch.Tensor | None = None,  # (D1..Dk)
    eps: float = 1e-5,
    *,
    upcast: bool = True,
) -> torch.Tensor:  # (*, D1..Dk)
    """LayerNorm over the last ``len(normalized_shape)`` dims, biased variance, as ``F.layer_norm``."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    dims = tuple(range(-len(normalized_shape), 0))
    dtype = compute_dtype(input.dtype, upcast)
    x = input.to(dtype)
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(input.dtype)


def rms_norm(
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,  # (D1..Dk)
    eps: float | None = None,
    *,
    upcast: bool = True,
) -> torch.Tensor:  # (*, D1..Dk)
    """RMSNorm over the last ``len(normalized_shape)`` dims, as ``F.rms_norm`` (eps None: ``finfo(input.dtype).eps``)."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(-len(normalized_shape), 0))
    dtype = compute_dtype(input.dtype, upcast)
    x = input.to(dtype)
    y = x * torch.rsqrt((x * x).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    return y.to(input.dtype)


def _dropped(input: torch.Tensor, dropout_p: float, dropout_mask: torch.Tensor | None) -> torch.Tensor:
    if dropout_p == 0.0:
        return input
    if dropout_mask is not None:  # the fused kernels' mask, (*, D1..Dk) bool, True = kept
        return input * dropout_mask.to(input.dtype) / (1.0 - dropout_p)
    return torch.nn.functional.dropout(input, p=dropout_p, training=True)


def add_layer_norm(
    input: torch.Tensor,  # (*, D1..Dk)
    residual: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,  # (D1..Dk)
    bias: torch.Tensor | None = None,  # (D1..Dk)
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    *,
    dropout_mask: torch.Tensor | None = None,  # (*, D1..Dk) bool, True = kept; torch's dropout if None
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # output, residual_out (*, D1..Dk)
    """``h = dropout(input) + residual`` in input's dtype, then ``(layer_norm(h), h)``: the composite."""
    h = _dropped(input, dropout_p, dropout_mask) + residual
    return layer_norm(h, normalized_shape, weight, bias, eps, upcast=upcast), h


def add_rms_norm(
    input: torch.Tensor,  # (*, D1..Dk)
    residual: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,  # (D1..Dk)
    eps: float | None = None,
    dropout_p: float = 0.0,
    *,
    dropout_mask: torch.Tensor | None = None,  # (*, D1..Dk) bool, True = kept; torch's dropout if None
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # output, residual_out (*, D1..Dk)
    """``h = dropout(input) + residual`` in input's dtype, then ``(rms_norm(h), h)``: the composite."""
    h = _dropped(input, dropout_p, dropout_mask) + residual
    return rms_norm(h, normalized_shape, weight, eps, upcast=upcast), h


def gelu(
    input: torch.Tensor,  # (*, D)
    approximate: str = "none",
    bias: torch.Tensor | None = None,  # (D,)
    *,
    upcast: bool = True,
) -> torch.Tensor:  # (*, D)
    """gelu(input + bias): exact, x·Φ(x), or the tanh approximation."""
    dtype = compute_dtype(input.dtype, upcast)
    x = input.to(dtype)
    if bias is not None:
        x = x + bias.to(dtype)
    if approximate == "tanh":
        y = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    elif approximate == "none":
        y = 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    else:
        raise ValueError(f"gelu: expected approximate to be 'none' or 'tanh', got {approximate!r}")
    return y.to(input.dtype)
