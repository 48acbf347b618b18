"""Triton decode attention: few query rows against a long key range, the key range split (flash-decoding).

A decode step has one query per sequence (a few with grouped-query attention or speculative tokens): the
forward kernel's grid, one program per (query tile, batch x head), would leave most of the GPU idle
while each program streams the whole key range. Here each (batch, kv head) packs the ``GROUP x L``
query rows of its query heads into one tile (GQA reads each key once for the whole group), and the key
range is cut into ``n_splits`` chunks, one program each: every program writes its chunk's unnormalised
partial output with the rows' running max and sum, and a merge kernel combines the chunks by their
log-sum-exp. The work per program is bounded, the grid is ``n_splits x B·Hk x row blocks``, and K and
V are read exactly once: a memory-bound kernel, as decode attention is.

Semantics as the forward kernel's (fusedformer/kernels/attention.py), plus per-sequence key counts (``seq_lens``,
keys past them are never read: a KV cache's empty slots) and causality aligned top-left (``CAUSAL=1``,
query i sees keys j <= i, as SDPA) or bottom-right (``CAUSAL=2``, j <= n_b - L + i, a KV cache). Rows
with no key give 0 and logsumexp +inf. Accumulation in fp32; probabilities rounded to V's dtype for the
second product, as in the forward kernel. bf16 under the interpreter and TF32 as in the forward kernel
(``INTERP_BF16``, ``PRECISION``: fusedformer/kernels/_common.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusedformer.kernels._common import INTERPRET, div_rn, dot, dot_precision, interp_bf16, round_to, widen

__all__ = ["decode_shaped", "decode_forward"]

_LN2 = tl.constexpr(0.6931471805599453)
_MASK_FLOOR = tl.constexpr(-2.0e38)  # as fusedformer/kernels/attention.py: finite mask values clamped, x log2(e) stays finite
_LOG2E = tl.constexpr(1.4426950408889634)

# Decode-shaped: at most this many packed query rows per kv head, against at least this many keys.
DECODE_ROWS = 16
DECODE_MIN_KEYS = 256
_BLOCK_M = 16  # tl.dot's smallest M
_BLOCK_N = 32 if INTERPRET else 64


def decode_shaped(Hq: int, Hk: int, L: int, S: int) -> bool:
    """Whether the decode kernels serve a forward of these sizes (no dropout)."""
    return Hk > 0 and (Hq // Hk) * L <= DECODE_ROWS and S >= DECODE_MIN_KEYS


@triton.jit
def _decode_partial_kernel(
    Q,  # (B, Hq, L, E)
    K,  # (B, Hk, S, E)
    V,  # (B, Hk, S, Ev)
    Mask,  # broadcastable to (B, Hq, L, S), strides 0 on broadcast dims; unused without HAS_MASK
    SeqLens,  # (B,) int: keys of sequence b; unused without HAS_LENS
    PartO,  # (B·Hk, row blocks, n_splits, BLOCK_M, BLOCK_DV) fp32: unnormalised partial outputs
    PartML,  # (B·Hk, row blocks, n_splits, BLOCK_M, 2) fp32: rows' max (log2 units) and sum
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    Hk, GROUP, L, S, E, Ev, CHUNK, N_SPLITS, N_ROW_BLOCKS,
    qk_scale,  # scale·log2(e)
    HAS_LENS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    rb = tl.program_id(2)
    b = (bhk // Hk).to(tl.int64)
    hk = (bhk % Hk).to(tl.int64)
    if HAS_LENS:
        n = tl.load(SeqLens + b).to(tl.int32)
    else:
        n = S
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # packed row r = g·L + i: query head hk·GROUP + g, query i
    row_ok = rows < GROUP * L
    g = rows // L
    i = rows % L
    h = hk * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_ql + offs_d[None, :] * stride_qe,
        mask=row_ok[:, None] & (offs_d[None, :] < E),
        other=0.0,
    )
    # the keys each row may see: j < n, and j <= i (top-left) or j <= n - L + i (bottom-right)
    if CAUSAL == 1:
        last = i
    elif CAUSAL == 2:
        last = n - L + i
    else:
        last = i * 0 + n - 1
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, n)
    if CAUSAL != 0:
        hi = tl.minimum(hi, tl.max(tl.where(row_ok, last, -1), 0) + 1)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        kT = tl.load(
            K + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_ke,
            mask=(offs_d[:, None] < E) & key_ok[None, :],
            other=0.0,
        )
        s = dot(q, kT, None, PRECISION, INTERP_BF16) * qk_scale
        keep = row_ok[:, None] & key_ok[None, :] & (offs_n[None, :] <= last[:, None])
        if HAS_MASK:
            mask_ptrs = Mask + b * stride_mb + h[:, None] * stride_mh + i[:, None] * stride_ml + offs_n[None, :] * stride_ms
            if MASK_IS_BOOL:
                keep = keep & (tl.load(mask_ptrs, mask=keep, other=0) != 0)
            else:
                m = widen(tl.load(mask_ptrs, mask=keep, other=float("-inf")))
                keep = keep & (m != float("-inf"))
                s += tl.maximum(m, _MASK_FLOOR) * _LOG2E
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(
            V + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_ve,
            mask=key_ok[:, None] & (offs_dv[None, :] < Ev),
            other=0.0,
        )
        acc = dot(round_to(p, V.dtype.element_ty, INTERP_BF16), v, acc, PRECISION, INTERP_BF16)
        m_i = m_new
    part = (bhk * N_ROW_BLOCKS + rb) * N_SPLITS + split
    offs_r = tl.arange(0, BLOCK_M)
    tl.store(PartO + (part * BLOCK_M + offs_r[:, None]) * BLOCK_DV + offs_dv[None, :], acc)
    tl.store(PartML + (part * BLOCK_M + offs_r) * 2, m_i)
    tl.store(PartML + (part * BLOCK_M + offs_r) * 2 + 1, l_i)


@triton.jit
def _decode_merge_kernel(
    PartO, PartML,
    Out,  # (B, Hq, L, Ev)
    Lse,  # (B, Hq, L) float32
    stride_ob, stride_oh, stride_ol, stride_oe,
    stride_lb, stride_lh, stride_ll,
    Hk, GROUP, L, Ev, N_SPLITS, N_ROW_BLOCKS,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)  # packed row of (b, hk)
    bhk = tl.program_id(1)
    b = (bhk // Hk).to(tl.int64)
    hk = (bhk % Hk).to(tl.int64)
    rb = r // BLOCK_M
    rl = r % BLOCK_M
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_ok = offs_s < N_SPLITS
    base = ((bhk * N_ROW_BLOCKS + rb) * N_SPLITS + offs_s) * BLOCK_M + rl  # (BLOCK_S,) partial rows
    m = tl.load(PartML + base * 2, mask=split_ok, other=float("-inf"))
    l = tl.load(PartML + base * 2 + 1, mask=split_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_safe))
    l_sum = tl.sum(l * w, 0)
    o = tl.load(PartO + base[:, None] * BLOCK_DV + offs_dv[None, :], mask=split_ok[:, None], other=0.0)
    o = tl.sum(o * w[:, None], 0)
    empty = l_sum == 0.0
    out = o * div_rn(1.0, tl.where(empty, 1.0, l_sum))
    lse = tl.where(empty, float("inf"), (m_safe + tl.math.log2(tl.where(empty, 1.0, l_sum))) * _LN2)
    g = r // L
    i = r % L
    h = hk * GROUP + g
    tl.store(
        Out + b * stride_ob + h * stride_oh + i * stride_ol + offs_dv * stride_oe,
        round_to(out, Out.dtype.element_ty, INTERP_BF16),
        mask=offs_dv < Ev,
    )
    tl.store(Lse + b * stride_lb + h * stride_lh + i * stride_ll, lse)


def _mask_args(attn_mask: torch.Tensor | None, dummy: torch.Tensor):
    """(tensor, 4 strides with 0 on broadcast dims, HAS_MASK, MASK_IS_BOOL); never expands or copies."""
    if attn_mask is None:
        return dummy, (0, 0, 0, 0), False, False
    pad = 4 - attn_mask.dim()
    sizes = (1,) * pad + tuple(attn_mask.shape)
    strides = (0,) * pad + tuple(attn_mask.stride())
    strides = tuple(0 if n == 1 else st for n, st in zip(sizes, strides))
    is_bool = attn_mask.dtype == torch.bool
    return (attn_mask.view(torch.uint8) if is_bool else attn_mask), strides, True, is_bool


def _num_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def decode_forward(
    query: torch.Tensor,  # (B, Hq, L, E)
    key: torch.Tensor,  # (B, Hk, S, E)
    value: torch.Tensor,  # (B, Hk, S, Ev)
    attn_mask: torch.Tensor | None,  # broadcastable to (B, Hq, L, S)
    causal: int,  # 0 none, 1 top-left (SDPA), 2 bottom-right (a KV cache)
    scale: float,
    seq_lens: torch.Tensor | None = None,  # (B,) int: keys per sequence (<= S); None: S
    max_keys: int | None = None,  # an upper bound of seq_lens (sizes the split); None: S
) -> tuple[torch.Tensor, torch.Tensor]:  # out (B, Hq, L, Ev) in query's dtype; logsumexp (B, Hq, L) float32
    """Split-key decode attention: partial results per key chunk, merged by their log-sum-exp.

    Inputs are checked by the caller (fusedformer/kernels/attention.py's ``attention_forward``, or the KV-cache op).
    """
    B, Hq, L, E = query.shape
    Hk, S, Ev = key.shape[1], key.shape[2], value.shape[3]
    out = torch.empty((B, Hq, L, Ev), dtype=query.dtype, device=query.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out, lse
    group = Hq // Hk
    rows = group * L
    n_row_blocks = triton.cdiv(rows, _BLOCK_M)
    keys = S if max_keys is None else max(1, min(int(max_keys), S))
    # enough programs to fill the device, chunks of at least 4 key tiles
    pairs = B * Hk * n_row_blocks
    n_splits = max(1, min(triton.cdiv(_num_programs(query.device), pairs), triton.cdiv(keys, 4 * _BLOCK_N)))
    chunk = triton.cdiv(triton.cdiv(keys, n_splits), _BLOCK_N) * _BLOCK_N
    n_splits = triton.cdiv(keys, chunk)
    BLOCK_D = max(16, triton.next_power_of_2(E))
    BLOCK_DV = max(16, triton.next_power_of_2(Ev))
    part_o = torch.empty((pairs * n_splits * _BLOCK_M * BLOCK_DV,), dtype=torch.float32, device=query.device)
    part_ml = torch.empty((pairs * n_splits * _BLOCK_M * 2,), dtype=torch.float32, device=query.device)
    mask, mask_strides, has_mask, mask_is_bool = _mask_args(attn_mask, query)
    lens = seq_lens if seq_lens is not None else query
    bf16 = interp_bf16(query.dtype)
    torch.library.wrap_triton(_decode_partial_kernel)[(n_splits, B * Hk, n_row_blocks)](
        query, key, value, mask, lens, part_o, part_ml,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides,
        Hk, group, L, S, E, Ev, chunk, n_splits, n_row_blocks, float(scale) * math.log2(math.e),
        HAS_LENS=seq_lens is not None, HAS_MASK=has_mask, MASK_IS_BOOL=mask_is_bool, CAUSAL=int(causal),
        INTERP_BF16=bf16, PRECISION=dot_precision(query.dtype), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
    )  # fmt: skip
    torch.library.wrap_triton(_decode_merge_kernel)[(rows, B * Hk)](
        part_o, part_ml, out, lse, *out.stride(), *lse.stride(),
        Hk, group, L, Ev, n_splits, n_row_blocks,
        INTERP_BF16=bf16, BLOCK_M=_BLOCK_M, BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_DV=BLOCK_DV,
    )  # fmt: skip
    return out, lse


def attention_with_kv_cache(
    query: torch.Tensor,  # (B, Hq, L, E)
    k_cache: torch.Tensor,  # (B, Hk, S_max, E), written in place
    v_cache: torch.Tensor,  # (B, Hk, S_max, Ev), written in place
    key: torch.Tensor | None,  # (B, Hk, L, E)
    value: torch.Tensor | None,  # (B, Hk, L, Ev)
    cache_seqlens: torch.Tensor | None,  # (B,) int on query's device: entries before the call
    is_causal: bool,
    scale: float,
) -> torch.Tensor:  # (B, Hq, L, Ev)
    """``fusedformer::attention_with_kv_cache`` on the GPU: lengths checked (one host sync) before the
    append, the append a scatter into the caches, then the decode kernels with bottom-right causality.

    Shapes, dtypes and devices are checked by the public function (fusedformer/ops/kv_cache.py).
    """
    B, Hq, L, E = query.shape
    Hk, S_max, Ev = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    lens = None
    max_keys = S_max
    if cache_seqlens is not None:
        before = cache_seqlens.to(torch.int64)
        lens = before + L if key is not None else before
        low, high = torch.stack([before.min(), lens.max()]).tolist() if B else (0, 0)  # the one sync
        if low < 0:
            raise ValueError(f"fusedformer.attention_with_kv_cache: expected cache_seqlens >= 0, got {low}")
        if high > S_max:
            raise ValueError(
                f"fusedformer.attention_with_kv_cache: the cache overflows: a sequence would hold {high} "
                f"entries, more than S_max = {S_max}"
            )
        max_keys = high
    if key is not None:
        pos = (before[:, None] + torch.arange(L, device=query.device)).view(B, 1, L, 1)  # (B, 1, L, 1)
        k_cache.scatter_(2, pos.expand(B, Hk, L, E), key)
        v_cache.scatter_(2, pos.expand(B, Hk, L, Ev), value)
    if max_keys == 0 or query.numel() == 0:
        return query.new_zeros((B, Hq, L, Ev))
    out, _ = decode_forward(query, k_cache, v_cache, None, 2 if is_causal else 0, scale, lens, max_keys)
    return out
