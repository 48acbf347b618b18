"""Scaled dot-product attention in Triton: FlashAttention-2 forward and backward.

Shapes (``B`` batch, ``Hq``/``Hk`` query/key heads, ``L``/``S`` query/key lengths)::

    query (B, Hq, L, E)   key (B, Hk, S, E)   value (B, Hk, S, Ev)   attn_mask broadcastable to (B, Hq, L, S)
    out   (B, Hq, L, Ev)  logsumexp (B, Hq, L) float32, natural log, +inf where a row has no key

Grouped-query attention: ``Hq`` a multiple of ``Hk``, query head ``h`` reads key head ``h // (Hq // Hk)``.
``is_causal`` is aligned top-left as in torch (query ``i`` sees keys ``j <= i``); for L=3, S=5::

    1 0 0 0 0
    1 1 0 0 0
    1 1 1 0 0

Forward (``_attn_fwd_kernel``): a program per (query block of ``BLOCK_M`` rows, batch·head). It streams
``BLOCK_N`` key/value tiles through an online softmax held in float32, in log2 units (``exp2``, with
``scale·log2(e)`` folded into the scores), and saves the log-sum-exp. The key loop has two stages: the
blocks that need no masking work (below the causal diagonal and inside ``S``), then the blocks that
do (the diagonal and the ragged end); blocks above the diagonal are never visited. The attention mask
is read tile by tile through its strides (0 on broadcast dims), never expanded.

Backward, three kernels and no atomics, so the result is deterministic (bit-identical from run to run
for a given block configuration):

1. ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO ∘ O)`` per query row (and the renormaliser below).
2. ``_attn_bwd_dkdv_kernel``: a program per (key block, batch·kv-head) owns ``dK, dV`` of its keys; it
   loops over the query heads of its group and over the query blocks that see its keys.
3. ``_attn_bwd_dq_kernel``: a program per (query block, batch·head) owns ``dQ`` of its rows and loops
   over key blocks like the forward.

The probabilities are recomputed from the saved log-sum-exp; nothing of size L·S is ever stored.

Dropout (``dropout_p > 0``) acts on the probabilities after the softmax, with the C++ kernels' mask
(csrc/cpu/kernels/dropout.h): for query row ``i`` and key ``j`` of pair ``bh = b·Hq + h``,

    (row_key, col_key) = the 32-bit halves of splitmix64(seed + golden·(bh + 1))
    keep(i, j) = fmix32(fmix32(row_key + i) ^ fmix32(col_key + j)) >= round(p·2^32)

so one seed drops the same elements here and on the CPU. Each program computes its pair's keys from
the seed tensor (64-bit integer arithmetic, wrapping as in C++) and hashes its rows and keys once per
tile; the mask is drawn again in the backward, never stored. As on the CPU, the forward sums the
un-dropped ``p`` into the softmax denominator (the log-sum-exp is the ordinary one) and multiplies ``p``
by ``D = keep / (1 - p)`` before ``p·V``; the backward uses ``D·p`` for ``dV`` and ``dP = D ∘ (dO·Vᵀ)``
in ``dS = p ∘ (dP - delta)``, ``delta = rowsum(dO ∘ O)`` of the dropped output as without dropout.

Launch: every kernel runs on a 1-D grid of (blocks × batch·heads) programs (``_common.flat_grid``):
CUDA caps grid dims y and z at 65,535, which B·H can pass. Autotuning is keyed on the lengths' buckets
(the next power of two, at least 16: ``length_bucket``), not on L and S themselves, so a new length
re-tunes only when it enters a new bucket (a decode step, a padded batch); configs whose tiles would not
fit the device's shared memory (an estimate, ``_smem_bytes``) are pruned before tuning.

Head dims 1..256 (``E`` and ``Ev`` independently) are padded inside the kernel to ``BLOCK_D``/``BLOCK_DV``,
the next power of two (at least 16), with masked loads: the inputs are never copied, any strides work.
Dtypes float16, bfloat16 (tensor-core dots) and float32: full float32 products
(``input_precision="ieee"``, on CUDA cores, so much slower than the half dtypes) as torch computes
float32 attention, or TF32 where torch allows it (``torch.backends.cuda.matmul.allow_tf32``, see
``_common.dot_precision``); float64 is not implemented and refused with an error (the cpp and reference
backends take it). bf16 runs the GPU's own path under the interpreter but for two steps
(``_common``'s note says which).

Numerics. Scores, softmax statistics and every accumulator are float32; ``p`` and ``dS`` are rounded to
the input dtype right before their tensor-core dots, as FlashAttention-2 does. The backward recomputes
the probabilities as ``exp2(s - lse)``: where the recomputed scores round differently from the
forward's (a different summation order of q·k), their error enters unnormalised. It is invisible in
float16/bfloat16; in float32 with large scores (|s| ~ 10 and E = 256) it can reach a few 1e-6 relative.
Under the interpreter the dK/dV kernel's k·qᵀ and the forward's q·kᵀ are summed in different orders
by numpy's BLAS; on a GPU, Triton lowers IEEE float32 dots to FMA chains along k, which should give
the same scores in both orientations (expected, not measured: no GPU here).

Masking semantics. A bool mask marks with True the keys that take part; a float mask is added to the
scores. A row with no key to attend to (all masked by False / -inf, or causal with S = 0) gives
output 0, log-sum-exp +inf and gradient 0, never NaN. A finite mask, however negative (Hugging Face
uses ``finfo.min``), is a score like any other: the softmax runs as usual. Its log-sum-exp may then be
so large (|lse| ~ 1e38) that float32 cannot hold it relative to the scores; for a float mask the
preprocess kernel detects such rows and recomputes their softmax normaliser, so that the backward
stays exact for them too.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusedformer.kernels._common import (
    INTERPRET,
    div_rn,
    dot,
    dot_precision,
    flat_grid,
    interp_bf16,
    length_bucket,
    max_shared_memory,
    round_to,
    tune_configs,
    widen,
)
from fusedformer.kernels.decode import _mask_args, decode_forward, decode_shaped

__all__ = [
    "attention_forward",
    "attention_backward",
    "varlen_attention_forward",
    "varlen_attention_backward",
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
]

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# a float mask is clamped here before the log2(e) factor (so finfo.min stays finite); -inf stays -inf
_MASK_FLOOR = tl.constexpr(-2.0e38)
# |lse| in log2 units from which a row's saved log-sum-exp is too coarse to recompute probabilities
# from directly (float32 keeps 24 bits; with |lse| >= 64 they leave < 2^-17 for the fraction)
_RENORM_LSE2 = tl.constexpr(64.0)


def _fwd_configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    full = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64)
        for w in (4, 8)
        for s in (2, 3, 4)
    ]
    quick = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=3)
             for bm, bn, w in ((128, 64, 8), (64, 64, 4), (128, 32, 4))]
    return tune_configs(full, quick)


def _dkdv_configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    full = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn in ((16, 64), (32, 64), (32, 128), (64, 64), (64, 128))
        for w in (4, 8)
        for s in (2, 3)
    ]
    quick = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
             for bm, bn, w, s in ((32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2))]
    return tune_configs(full, quick)


def _dq_configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    full = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn in ((64, 16), (64, 32), (128, 32), (64, 64), (128, 64))
        for w in (4, 8)
        for s in (2, 3)
    ]
    quick = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
             for bm, bn, w, s in ((128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2))]
    return tune_configs(full, quick)


def _smem_bytes(kind: str, config: triton.Config, D: int, DV: int, size: int) -> int:
    """An estimate of the shared memory ``config`` takes in kernel ``kind`` (bytes), for padded head dims
    D, DV and elements of ``size`` bytes: the tiles the loop streams, once per pipeline stage; the tiles
    that stay resident and feed a dot; one (BLOCK_M, BLOCK_N) float32 tile for layout conversions.
    Triton's real allocation may differ a little; a config that still does not fit fails to launch and
    the autotuner skips it, so the estimate only has to drop the hopeless ones before they compile."""
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    if kind == "fwd":  # q (BLOCK_M, D) resident; k (BLOCK_N, D) and v (BLOCK_N, DV) streamed
        tiles = bm * D + stages * bn * (D + DV)
    elif kind == "dkdv":  # k, v (BLOCK_N, D + DV) resident; q (BLOCK_M, D) and dO (BLOCK_M, DV) streamed
        tiles = bn * (D + DV) + stages * bm * (D + DV)
    else:  # "dq": q, dO (BLOCK_M, D + DV) resident; k, v (BLOCK_N, D + DV) streamed
        tiles = bm * (D + DV) + stages * bn * (D + DV)
    return tiles * size + bm * bn * 4


def _pruner(kind: str):
    """The autotuner's early prune for kernel ``kind``: tiles that fit in registers (a product of tile
    sizes, as tuned for head dim 128 in fp16) and in the device's shared memory (``_smem_bytes``)."""

    def prune(configs, named_args, **kwargs):
        D, DV = kwargs["BLOCK_D"], kwargs["BLOCK_DV"]
        size = named_args["Q"].element_size()
        limit = max_shared_memory(named_args["Q"].device)

        def fits(c):
            regs = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * max(D, DV) * size <= 128 * 64 * 128 * 2
            return regs and (limit is None or _smem_bytes(kind, c, D, DV, size) <= limit)

        kept = [c for c in configs if fits(c)]
        return kept or [min(configs, key=lambda c: _smem_bytes(kind, c, D, DV, size))]

    return prune


# Autotuning is keyed on the lengths' buckets (L_BUCKET, S_BUCKET: length_bucket), not on L and S.
_TUNE_KEY = ["L_BUCKET", "S_BUCKET", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_MASK", "DROPOUT", "VARLEN"]


# ---- shared pieces ------------------------------------------------------------------------------


@triton.jit
def _scores(
    qk,  # (rows, cols) fp32 tile of q·k, either layout
    offs_l,  # query index of each element, broadcastable to qk's shape
    offs_s,  # key index of each element, broadcastable to qk's shape
    Mask,  # this (batch, head)'s mask base pointer; unused without HAS_MASK
    stride_ml,
    stride_ms,
    L,
    S,
    qk_scale,  # scale·log2(e)
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # apply the causal and key-bounds masks (diagonal/ragged tiles only)
    IS_CAUSAL: tl.constexpr,
):
    """The scores in log2 units, -inf where a key does not take part."""
    s = qk * qk_scale
    if HAS_MASK:
        # outside the (L, S) rectangle no key takes part
        inside = (offs_l < L) & (offs_s < S)
        mask_ptrs = Mask + offs_l * stride_ml + offs_s * stride_ms
        if MASK_IS_BOOL:
            s = tl.where(tl.load(mask_ptrs, mask=inside, other=0) != 0, s, float("-inf"))
        else:
            m = tl.where(inside, widen(tl.load(mask_ptrs, mask=inside, other=0.0)), float("-inf"))
            s += tl.where(m == float("-inf"), m, tl.maximum(m, _MASK_FLOOR) * _LOG2E)
    if MASK_KEYS:
        keep = offs_s < S
        if IS_CAUSAL:
            keep = keep & (offs_s <= offs_l)
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _fmix32(x):  # uint32 tile: MurmurHash3's finaliser, fmix32 of csrc/cpu/kernels/dropout.h
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    x = x ^ (x >> 16)
    return x


@triton.jit
def _dropout_keys(
    Seed,  # (1,) int64
    bh,  # int64: b·Hq + h
):
    """(row_key, col_key), uint32: the halves of splitmix64(seed + golden·(bh + 1)), as dropout_keys."""
    z = tl.load(Seed).to(tl.uint64, bitcast=True) + 0x9E3779B97F4A7C15 * (bh + 1).to(tl.uint64)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return z.to(tl.uint32), (z >> 32).to(tl.uint32)


@triton.jit
def _dropout_hash(key, idx):
    """Rows: A_i = fmix32(row_key + i); keys: C_j = fmix32(col_key + j) (uint32 vectors)."""
    return _fmix32(idx.to(tl.uint32) + key)


@triton.jit
def _dropout_rows(Seed, bh, offs_m, drop_threshold, DROPOUT: tl.constexpr):
    """(A_i of rows offs_m, col_key of pair bh, the threshold as uint32): what a query block needs to draw
    its mask; zeros (unused) without DROPOUT."""
    if DROPOUT:
        row_key, col_key = _dropout_keys(Seed, bh)
        row_hash = _dropout_hash(row_key, offs_m)
        threshold = drop_threshold.to(tl.uint32)
    else:
        row_hash, col_key, threshold = 0, 0, 0
    return row_hash, col_key, threshold


@triton.jit
def _dropout(x, row_hash, col_hash, threshold, keep_scale):
    """x·keep/(1 - p), keep = fmix32(A_i ^ C_j) >= threshold; the hashes broadcast to x's shape."""
    return tl.where(_fmix32(row_hash ^ col_hash) >= threshold, x * keep_scale, 0.0)


@triton.jit
def _causal_stages(start_m, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """For the query rows start_m.., the key ranges [0, mid) (no masking work) and [mid, hi) (masked)."""
    s_even = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # key block n..n+BLOCK_N-1 is wholly visible to every row iff n + BLOCK_N - 1 <= start_m
        mid = tl.minimum(((start_m + 1) // BLOCK_N) * BLOCK_N, s_even)
        hi = tl.minimum(start_m + BLOCK_M, S)
    else:
        mid = s_even
        hi = S
    return mid, hi


@triton.jit
def _varlen_bounds(CuQ, CuK, b):
    """Packed sequence b: its first query row q0, length L, first key row k0, length S."""
    q0 = tl.load(CuQ + b).to(tl.int64)
    k0 = tl.load(CuK + b).to(tl.int64)
    L = tl.load(CuQ + b + 1) - q0.to(tl.int32)
    S = tl.load(CuK + b + 1) - k0.to(tl.int32)
    return q0, L, k0, S


# ---- forward ------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    K, V, Mask,
    stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
    offs_m, lo, hi, L, S, E, Ev, qk_scale,
    row_hash, col_key, threshold, keep_scale,  # dropout: the rows' A_i, the pair's col_key; unused without
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KEYS: tl.constexpr,
    DROPOUT: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # -- scores of this key tile: kT (BLOCK_D, BLOCK_N)
        if MASK_KEYS:
            k_mask = (offs_d[:, None] < E) & (offs_n[None, :] < S)
        else:
            k_mask = offs_d[:, None] < E
        kT = tl.load(K + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_ke, mask=k_mask, other=0.0)
        qk = dot(q, kT, None, PRECISION, INTERP_BF16)
        s = _scores(
            qk, offs_m[:, None], offs_n[None, :], Mask, stride_ml, stride_ms, L, S, qk_scale,
            HAS_MASK, MASK_IS_BOOL, MASK_KEYS, IS_CAUSAL,
        )  # fmt: skip
        # -- online softmax; a row that has seen no key yet keeps m = -inf and adds nothing
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:  # l sums the un-dropped p; p·v sees p·keep/(1 - p)
            col_hash = _dropout_hash(col_key, offs_n)[None, :]
            p = _dropout(p, row_hash[:, None], col_hash, threshold, keep_scale)
        # -- acc += p·v, p rounded to v's dtype as the tensor cores take it
        if MASK_KEYS:
            v_mask = (offs_n[:, None] < S) & (offs_dv[None, :] < Ev)
        else:
            v_mask = offs_dv[None, :] < Ev
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_ve, mask=v_mask, other=0.0)
        acc = dot(round_to(p, V.dtype.element_ty, INTERP_BF16), v, acc, PRECISION, INTERP_BF16)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_fwd_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")}
)
@triton.jit(do_not_specialize=["drop_threshold"])  # 1 would become a constexpr, with no .to
def _attn_fwd_kernel(
    Q,  # (B, Hq, L, E)
    K,  # (B, Hk, S, E)
    V,  # (B, Hk, S, Ev)
    Mask,  # broadcastable to (B, Hq, L, S): strides 0 on broadcast dims; unused without HAS_MASK
    Out,  # (B, Hq, L, Ev)
    Lse,  # (B, Hq, L) float32
    Seed,  # (1,) int64; unused without DROPOUT
    CuQ,  # (B + 1,) int32 cumulative query lengths; only with VARLEN
    CuK,  # (B + 1,) int32 cumulative key lengths; only with VARLEN
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_ob, stride_oh, stride_ol, stride_oe,
    stride_lb, stride_lh, stride_ll,
    Hq, GROUP, L, S, E, Ev,
    L_BUCKET, S_BUCKET,  # autotuning keys only: length_bucket(L), length_bucket(S)
    qk_scale,  # scale·log2(e)
    drop_threshold, drop_scale,  # round(p·2^32) and 1/(1 - p); unused without DROPOUT
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # a 1-D grid (flat_grid): program pid takes query block pid % n_blocks of pair bh = pid // n_blocks
    n_blocks = tl.cdiv(L, BLOCK_M)
    off_bh = tl.program_id(0) // n_blocks
    start_m = (tl.program_id(0) % n_blocks) * BLOCK_M
    b = (off_bh // Hq).to(tl.int64)
    h = (off_bh % Hq).to(tl.int64)
    hk = h // GROUP
    if VARLEN:
        # sequence b: rows [q0, q0 + L) of the packed tensors (batch strides 0); L, S were the maxima
        q0, L, k0, S = _varlen_bounds(CuQ, CuK, b)
        Q += q0 * stride_ql
        K += k0 * stride_ks
        V += k0 * stride_vs
        Out += q0 * stride_ol
        Lse += q0 * stride_ll
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    Mask += b * stride_mb + h * stride_mh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # q stays in registers for the whole loop
    q = tl.load(
        Q + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qe,
        mask=(offs_m[:, None] < L) & (offs_d[None, :] < E),
        other=0.0,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    row_hash, col_key, threshold = _dropout_rows(Seed, off_bh.to(tl.int64), offs_m, drop_threshold, DROPOUT)
    mid, hi = _causal_stages(start_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if VARLEN:  # a query block past its sequence's end visits no key
        hi = tl.where(start_m < L, hi, 0)
        mid = tl.minimum(mid, hi)
    # stage 1: key blocks below the diagonal and inside S; stage 2: the diagonal and the ragged end
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K, V, Mask,
        stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
        offs_m, 0, mid, L, S, E, Ev, qk_scale, row_hash, col_key, threshold, drop_scale,
        HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, False, DROPOUT, INTERP_BF16, PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K, V, Mask,
        stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
        offs_m, mid, hi, L, S, E, Ev, qk_scale, row_hash, col_key, threshold, drop_scale,
        HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, True, DROPOUT, INTERP_BF16, PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
    )  # fmt: skip
    # epilogue: rows with no key (l = 0) give 0 and lse = +inf
    empty = l_i == 0.0
    inv_l = div_rn(1.0, tl.where(empty, 1.0, l_i))
    out = acc * inv_l[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    Out += b * stride_ob + h * stride_oh
    tl.store(
        Out + offs_m[:, None] * stride_ol + offs_dv[None, :] * stride_oe,
        round_to(out, Out.dtype.element_ty, INTERP_BF16),
        mask=(offs_m[:, None] < L) & (offs_dv[None, :] < Ev),
    )
    tl.store(Lse + b * stride_lb + h * stride_lh + offs_m * stride_ll, lse, mask=offs_m < L)


# ---- backward -----------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    O,  # (B, Hq, L, Ev)
    DO,  # (B, Hq, L, Ev)
    Delta,  # (B, Hq, L) float32, contiguous: rowsum(dO ∘ O)
    Renorm,  # (B, Hq, L) float32, contiguous: 1/normaliser (1 for ordinary rows); only with RENORM
    Q,  # (B, Hq, L, E); only with RENORM
    K,  # (B, Hk, S, E); only with RENORM
    Mask,  # broadcastable to (B, Hq, L, S); only with RENORM
    Lse,  # (B, Hq, L) float32; only with RENORM
    CuQ,  # (B + 1,) int32 cumulative query lengths; only with VARLEN
    CuK,  # (B + 1,) int32 cumulative key lengths; only with VARLEN
    stride_ob, stride_oh, stride_ol, stride_oe,
    stride_dob, stride_doh, stride_dol, stride_doe,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_lb, stride_lh, stride_ll,
    Hq, GROUP, L, S, E, Ev,
    qk_scale,
    TOTAL_Q,  # with VARLEN: Delta is (Hq, TOTAL_Q), row h * TOTAL_Q + q0 + i
    RENORM: tl.constexpr, IS_CAUSAL: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    n_blocks = tl.cdiv(L, BLOCK_M)  # a 1-D grid, as the forward's
    off_bh = tl.program_id(0) // n_blocks
    start_m = (tl.program_id(0) % n_blocks) * BLOCK_M
    b = (off_bh // Hq).to(tl.int64)
    h = (off_bh % Hq).to(tl.int64)
    row0 = off_bh.to(tl.int64) * L
    if VARLEN:  # no RENORM here: varlen takes no mask
        q0, L, k0, S = _varlen_bounds(CuQ, CuK, b)
        O += q0 * stride_ol
        DO += q0 * stride_dol
        row0 = h * TOTAL_Q + q0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_o = (offs_m[:, None] < L) & (offs_dv[None, :] < Ev)
    o = widen(tl.load(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_dv[None, :] * stride_oe,
        mask=mask_o,
        other=0.0,
    ))
    do = widen(tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_dv[None, :] * stride_doe,
        mask=mask_o,
        other=0.0,
    ))
    row = row0 + offs_m
    tl.store(Delta + row, tl.sum(o * do, 1), mask=offs_m < L)
    if RENORM:
        # A float mask may put a row's scores near finfo.min: then lse is ~1e38 and float32 keeps no
        # digits of log(sum) beside it, so exp(s - lse) is off by up to a factor S. For such rows,
        # recompute the normaliser sum_j exp2(s_j - lse2) (exactly what the forward divided by).
        lse2 = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_ll, mask=offs_m < L, other=0.0)
        lse2 = lse2 * _LOG2E
        coarse = (tl.abs(lse2) >= _RENORM_LSE2) & (lse2 != float("inf"))
        renorm = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        if tl.max(coarse.to(tl.int32), 0) > 0:
            offs_d = tl.arange(0, BLOCK_D)
            q = tl.load(
                Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qe,
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < E),
                other=0.0,
            )
            K += b * stride_kb + (h // GROUP) * stride_kh
            Mask += b * stride_mb + h * stride_mh
            z = tl.zeros((BLOCK_M,), dtype=tl.float32)
            _, hi = _causal_stages(start_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
            for start_n in range(0, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                kT = tl.load(
                    K + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_ke,
                    mask=(offs_d[:, None] < E) & (offs_n[None, :] < S),
                    other=0.0,
                )
                qk = dot(q, kT, None, PRECISION, INTERP_BF16)
                s = _scores(
                    qk, offs_m[:, None], offs_n[None, :], Mask, stride_ml, stride_ms, L, S, qk_scale,
                    True, False, True, IS_CAUSAL,
                )  # fmt: skip
                z += tl.sum(tl.math.exp2(s - lse2[:, None]), 1)
            renorm = tl.where(coarse & (z > 0.0), div_rn(1.0, tl.where(z > 0.0, z, 1.0)), 1.0)
        tl.store(Renorm + row, renorm, mask=offs_m < L)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    Q, DO, Mask, Lse, Delta, Renorm,
    stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_ms, stride_ll,
    offs_n, lo, hi, L, S, E, Ev, qk_scale,
    row_key, col_hash, threshold, keep_scale,  # dropout: the pair's row_key, the keys' C_j; unused without
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KEYS: tl.constexpr,
    RENORM: tl.constexpr, DROPOUT: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    # Transposed tiles, as in Triton tutorial 06: sT, pT (BLOCK_N, BLOCK_M). Rows past L load
    # lse = +inf, so their p is 0 (keys past S only touch dK/dV rows that are never stored).
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_l = offs_m < L
        qT = tl.load(
            Q + offs_m[None, :] * stride_ql + offs_d[:, None] * stride_qe,
            mask=in_l[None, :] & (offs_d[:, None] < E),
            other=0.0,
        )
        do = tl.load(
            DO + offs_m[:, None] * stride_dol + offs_dv[None, :] * stride_doe,
            mask=in_l[:, None] & (offs_dv[None, :] < Ev),
            other=0.0,
        )
        lse2 = tl.load(Lse + offs_m * stride_ll, mask=in_l, other=float("inf")) * _LOG2E
        delta = tl.load(Delta + offs_m, mask=in_l, other=0.0)
        # -- pT = exp2(sT - lse2): the forward's probabilities, recomputed
        qkT = dot(k, qT, None, PRECISION, INTERP_BF16)
        sT = _scores(
            qkT, offs_m[None, :], offs_n[:, None], Mask, stride_ml, stride_ms, L, S, qk_scale,
            HAS_MASK, MASK_IS_BOOL, MASK_KEYS, IS_CAUSAL,
        )  # fmt: skip
        pT = tl.math.exp2(sT - lse2[None, :])
        if RENORM:
            pT *= tl.load(Renorm + offs_m, mask=in_l, other=1.0)[None, :]
        # -- dV += (D∘p)ᵀ·dO; dSᵀ = pᵀ ∘ (D∘(V·dOᵀ) - delta); dK += dSᵀ·Q (scaled at the end); D = 1
        # without dropout, else keep/(1 - p) from the forward's hash, drawn again
        dpT = dot(v, tl.trans(do), None, PRECISION, INTERP_BF16)
        if DROPOUT:
            row_hash = _dropout_hash(row_key, offs_m)[None, :]
            pdT = _dropout(pT, row_hash, col_hash[:, None], threshold, keep_scale)
            dpT = _dropout(dpT, row_hash, col_hash[:, None], threshold, keep_scale)
        else:
            pdT = pT
        dv = dot(round_to(pdT, DO.dtype.element_ty, INTERP_BF16), do, dv, PRECISION, INTERP_BF16)
        dsT = pT * (dpT - delta[None, :])
        ds_op = round_to(dsT, Q.dtype.element_ty, INTERP_BF16)
        dk = dot(ds_op, tl.trans(qT), dk, PRECISION, INTERP_BF16)
    return dk, dv


@triton.autotune(
    configs=_dkdv_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dkdv")}
)
@triton.jit(do_not_specialize=["drop_threshold"])  # 1 would become a constexpr, with no .to
def _attn_bwd_dkdv_kernel(
    Q,  # (B, Hq, L, E)
    K,  # (B, Hk, S, E)
    V,  # (B, Hk, S, Ev)
    Mask,  # broadcastable to (B, Hq, L, S); unused without HAS_MASK
    DO,  # (B, Hq, L, Ev)
    Lse,  # (B, Hq, L) float32
    Delta,  # (B, Hq, L) float32, contiguous
    Renorm,  # (B, Hq, L) float32, contiguous; unused without RENORM
    DK,  # (B, Hk, S, E)
    DV,  # (B, Hk, S, Ev)
    Seed,  # (1,) int64; unused without DROPOUT
    CuQ,  # (B + 1,) int32 cumulative query lengths; only with VARLEN
    CuK,  # (B + 1,) int32 cumulative key lengths; only with VARLEN
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_dob, stride_doh, stride_dol, stride_doe,
    stride_lb, stride_lh, stride_ll,
    stride_dkb, stride_dkh, stride_dks, stride_dke,
    stride_dvb, stride_dvh, stride_dvs, stride_dve,
    Hk, GROUP, L, S, E, Ev,
    L_BUCKET, S_BUCKET,  # autotuning keys only
    scale, qk_scale,
    drop_threshold, drop_scale,  # unused without DROPOUT
    TOTAL_Q,  # with VARLEN: Delta is (Hq, TOTAL_Q)
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, RENORM: tl.constexpr,
    DROPOUT: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # a 1-D grid (flat_grid): key block pid % n_blocks of key pair pid // n_blocks
    n_blocks = tl.cdiv(S, BLOCK_N)
    off_bhk = tl.program_id(0) // n_blocks
    start_n = (tl.program_id(0) % n_blocks) * BLOCK_N
    b = (off_bhk // Hk).to(tl.int64)
    hk = (off_bhk % Hk).to(tl.int64)
    Hq = Hk * GROUP
    q_hi = L  # the query rows to visit end here
    if VARLEN:
        q0, L, k0, S = _varlen_bounds(CuQ, CuK, b)
        Q += q0 * stride_ql
        DO += q0 * stride_dol
        Lse += q0 * stride_ll
        K += k0 * stride_ks
        V += k0 * stride_vs
        DK += k0 * stride_dks
        DV += k0 * stride_dvs
        q_hi = tl.where(start_n < S, L, 0)  # a key block past its sequence's end visits no query
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # k and v of this key block stay in registers
    k = tl.load(
        K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_ke,
        mask=(offs_n[:, None] < S) & (offs_d[None, :] < E),
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_ve,
        mask=(offs_n[:, None] < S) & (offs_dv[None, :] < Ev),
        other=0.0,
    )
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    if IS_CAUSAL:
        # rows < start_n see none of these keys; rows below start_n + BLOCK_N see part of them
        lo = start_n
        mid = start_n + ((BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    if DROPOUT:
        threshold = drop_threshold.to(tl.uint32)
    else:
        threshold = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        if DROPOUT:
            row_key, col_key = _dropout_keys(Seed, b * Hq + h)
            col_hash = _dropout_hash(col_key, offs_n)
        else:
            row_key, col_hash = 0, 0
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        Maskh = Mask + b * stride_mb + h * stride_mh
        Lseh = Lse + b * stride_lb + h * stride_lh
        if VARLEN:
            row0 = h * TOTAL_Q + q0
        else:
            row0 = (b * Hq + h) * L
        # stage 1: the diagonal query blocks (causal mask); stage 2: the query blocks that see every key
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Qh, DOh, Maskh, Lseh, Delta + row0, Renorm + row0,
            stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_ms, stride_ll,
            offs_n, lo, tl.minimum(mid, q_hi), L, S, E, Ev, qk_scale, row_key, col_hash, threshold, drop_scale,
            HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, True, RENORM, DROPOUT, INTERP_BF16, PRECISION,
            BLOCK_M, BLOCK_D, BLOCK_DV,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Qh, DOh, Maskh, Lseh, Delta + row0, Renorm + row0,
            stride_ql, stride_qe, stride_dol, stride_doe, stride_ml, stride_ms, stride_ll,
            offs_n, mid, q_hi, L, S, E, Ev, qk_scale, row_key, col_hash, threshold, drop_scale,
            HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, False, RENORM, DROPOUT, INTERP_BF16, PRECISION,
            BLOCK_M, BLOCK_D, BLOCK_DV,
        )  # fmt: skip
    dk *= scale
    tl.store(
        DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dke,
        round_to(dk, DK.dtype.element_ty, INTERP_BF16),
        mask=(offs_n[:, None] < S) & (offs_d[None, :] < E),
    )
    tl.store(
        DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_dv[None, :] * stride_dve,
        round_to(dv, DV.dtype.element_ty, INTERP_BF16),
        mask=(offs_n[:, None] < S) & (offs_dv[None, :] < Ev),
    )


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta, renorm,
    K, V, Mask,
    stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
    offs_m, lo, hi, L, S, E, Ev, qk_scale,
    row_hash, col_key, threshold, keep_scale,  # dropout: the rows' A_i, the pair's col_key; unused without
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KEYS: tl.constexpr,
    RENORM: tl.constexpr, DROPOUT: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASK_KEYS:
            k_mask = (offs_d[:, None] < E) & (offs_n[None, :] < S)
            v_mask = (offs_dv[:, None] < Ev) & (offs_n[None, :] < S)
        else:
            k_mask = offs_d[:, None] < E
            v_mask = offs_dv[:, None] < Ev
        kT = tl.load(K + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_ke, mask=k_mask, other=0.0)
        vT = tl.load(V + offs_n[None, :] * stride_vs + offs_dv[:, None] * stride_ve, mask=v_mask, other=0.0)
        qk = dot(q, kT, None, PRECISION, INTERP_BF16)
        s = _scores(
            qk, offs_m[:, None], offs_n[None, :], Mask, stride_ml, stride_ms, L, S, qk_scale,
            HAS_MASK, MASK_IS_BOOL, MASK_KEYS, IS_CAUSAL,
        )  # fmt: skip
        p = tl.math.exp2(s - lse2[:, None])
        if RENORM:
            p *= renorm[:, None]
        # dS = p ∘ (D∘(dO·Vᵀ) - delta); dQ += dS·K (scaled at the end)
        dp = dot(do, vT, None, PRECISION, INTERP_BF16)
        if DROPOUT:
            col_hash = _dropout_hash(col_key, offs_n)[None, :]
            dp = _dropout(dp, row_hash[:, None], col_hash, threshold, keep_scale)
        ds = p * (dp - delta[:, None])
        dq = dot(round_to(ds, K.dtype.element_ty, INTERP_BF16), tl.trans(kT), dq, PRECISION, INTERP_BF16)
    return dq


@triton.autotune(
    configs=_dq_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dq")}
)
@triton.jit(do_not_specialize=["drop_threshold"])  # 1 would become a constexpr, with no .to
def _attn_bwd_dq_kernel(
    Q,  # (B, Hq, L, E)
    K,  # (B, Hk, S, E)
    V,  # (B, Hk, S, Ev)
    Mask,  # broadcastable to (B, Hq, L, S); unused without HAS_MASK
    DO,  # (B, Hq, L, Ev)
    Lse,  # (B, Hq, L) float32
    Delta,  # (B, Hq, L) float32, contiguous
    Renorm,  # (B, Hq, L) float32, contiguous; unused without RENORM
    DQ,  # (B, Hq, L, E)
    Seed,  # (1,) int64; unused without DROPOUT
    CuQ,  # (B + 1,) int32 cumulative query lengths; only with VARLEN
    CuK,  # (B + 1,) int32 cumulative key lengths; only with VARLEN
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_ks, stride_ke,
    stride_vb, stride_vh, stride_vs, stride_ve,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_dob, stride_doh, stride_dol, stride_doe,
    stride_lb, stride_lh, stride_ll,
    stride_dqb, stride_dqh, stride_dql, stride_dqe,
    Hq, GROUP, L, S, E, Ev,
    L_BUCKET, S_BUCKET,  # autotuning keys only
    scale, qk_scale,
    drop_threshold, drop_scale,  # unused without DROPOUT
    TOTAL_Q,  # with VARLEN: Delta is (Hq, TOTAL_Q)
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, RENORM: tl.constexpr,
    DROPOUT: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    n_blocks = tl.cdiv(L, BLOCK_M)  # a 1-D grid, as the forward's
    off_bh = tl.program_id(0) // n_blocks
    start_m = (tl.program_id(0) % n_blocks) * BLOCK_M
    b = (off_bh // Hq).to(tl.int64)
    h = (off_bh % Hq).to(tl.int64)
    hk = h // GROUP
    row0 = off_bh.to(tl.int64) * L
    if VARLEN:
        q0, L, k0, S = _varlen_bounds(CuQ, CuK, b)
        Q += q0 * stride_ql
        DO += q0 * stride_dol
        Lse += q0 * stride_ll
        DQ += q0 * stride_dql
        K += k0 * stride_ks
        V += k0 * stride_vs
        row0 = h * TOTAL_Q + q0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_l = offs_m < L
    # this block's q, dO, lse, delta stay in registers
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qe,
        mask=in_l[:, None] & (offs_d[None, :] < E),
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_dv[None, :] * stride_doe,
        mask=in_l[:, None] & (offs_dv[None, :] < Ev),
        other=0.0,
    )
    lse2 = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_ll, mask=in_l, other=float("inf"))
    lse2 = lse2 * _LOG2E
    row = row0 + offs_m
    delta = tl.load(Delta + row, mask=in_l, other=0.0)
    if RENORM:
        renorm = tl.load(Renorm + row, mask=in_l, other=1.0)
    else:
        renorm = delta  # unused
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    Mask += b * stride_mb + h * stride_mh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    row_hash, col_key, threshold = _dropout_rows(Seed, off_bh.to(tl.int64), offs_m, drop_threshold, DROPOUT)
    mid, hi = _causal_stages(start_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if VARLEN:  # a query block past its sequence's end visits no key
        hi = tl.where(start_m < L, hi, 0)
        mid = tl.minimum(mid, hi)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, renorm, K, V, Mask,
        stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
        offs_m, 0, mid, L, S, E, Ev, qk_scale, row_hash, col_key, threshold, drop_scale,
        HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, False, RENORM, DROPOUT, INTERP_BF16, PRECISION,
        BLOCK_N, BLOCK_D, BLOCK_DV,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, renorm, K, V, Mask,
        stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
        offs_m, mid, hi, L, S, E, Ev, qk_scale, row_hash, col_key, threshold, drop_scale,
        HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, True, RENORM, DROPOUT, INTERP_BF16, PRECISION,
        BLOCK_N, BLOCK_D, BLOCK_DV,
    )  # fmt: skip
    dq *= scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqe,
        round_to(dq, DQ.dtype.element_ty, INTERP_BF16),
        mask=in_l[:, None] & (offs_d[None, :] < E),
    )


# ---- launchers ----------------------------------------------------------------------------------

_FN = "fusedformer.kernels.attention"
_PRE_BLOCK_M = 32 if INTERPRET else 64
_PRE_BLOCK_N = 16 if INTERPRET else 64


def _check(query, key, value, attn_mask) -> None:
    """Raises, naming the argument, on anything these kernels cannot take."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{_FN}: expected {name} to be 4-D (B, H, L, E), got shape {tuple(t.shape)}")
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{_FN}: the Triton attention kernels take float16, bfloat16 or float32, got {query.dtype} "
            "(float64 is not supported: use the cpp or reference backend)"
        )
    if not (key.dtype == value.dtype == query.dtype):
        raise TypeError(
            f"{_FN}: expected query, key, value of one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (key.device == value.device == query.device):
        raise ValueError(f"{_FN}: expected query, key, value on one device")
    B, Hq, L, E = query.shape
    Bk, Hk, S, Ek = key.shape
    if Bk != B or value.shape[0] != B or value.shape[1] != Hk or value.shape[2] != S or Ek != E:
        raise ValueError(
            f"{_FN}: expected key (B, Hk, S, E) and value (B, Hk, S, Ev) for query (B, Hq, L, E), got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"{_FN}: expected query's heads ({Hq}) to be a multiple of key's ({Hk})")
    for name, d in (("E", E), ("Ev", value.shape[3])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{_FN}: head dim {name} must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{_FN}: expected attn_mask to be bool or floating, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"{_FN}: expected attn_mask on {query.device}, got {attn_mask.device}")
        target = (B, Hq, L, S)
        if attn_mask.dim() > 4 or any(
            m not in (1, t) for m, t in zip(attn_mask.shape[::-1], target[::-1])
        ):
            raise ValueError(
                f"{_FN}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}"
            )


def _head_blocks(E: int, Ev: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(E)), max(16, triton.next_power_of_2(Ev))


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, device: torch.device):
    """(seed on ``device``, threshold, keep_scale, DROPOUT) for the kernels, as the C++ kernels derive them
    (dropout_threshold: round(p·2^32), at most 2^32 - 1; keep_scale: 1/(1 - p) in float32)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_FN}: expected dropout_p in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return None, 0, 1.0, False
    if seed is None:
        raise ValueError(f"{_FN}: dropout_p > 0 needs a seed (a one-element int64 tensor), got None")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(
            f"{_FN}: expected seed to be a one-element int64 tensor, "
            f"got {seed.dtype} of shape {tuple(seed.shape)}"
        )
    threshold = min(int(dropout_p * 4294967296.0 + 0.5), 0xFFFFFFFF)
    return seed.reshape(1).to(device), threshold, 1.0 / (1.0 - dropout_p), True


def attention_forward(
    query: torch.Tensor,  # (B, Hq, L, E)
    key: torch.Tensor,  # (B, Hk, S, E)
    value: torch.Tensor,  # (B, Hk, S, Ev)
    attn_mask: torch.Tensor | None,  # broadcastable to (B, Hq, L, S): bool (True = take part) or additive
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,  # dropout on the probabilities, the C++ kernels' mask for this seed
    seed: torch.Tensor | None = None,  # () or (1,) int64, any device; needed when dropout_p > 0
    inference: bool = False,  # the op family's flag (no backward follows); these kernels sum S one way
) -> tuple[torch.Tensor, torch.Tensor]:  # out (B, Hq, L, Ev) in query's dtype; logsumexp (B, Hq, L) float32
    """FlashAttention-2 forward; see the module docstring for the semantics."""
    _check(query, key, value, attn_mask)
    seed_dev, threshold, keep_scale, dropout = _dropout_args(float(dropout_p), seed, query.device)
    B, Hq, L, E = query.shape
    Hk, S, Ev = key.shape[1], key.shape[2], value.shape[3]
    out = torch.empty((B, Hq, L, Ev), dtype=query.dtype, device=query.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out, lse
    if decode_shaped(Hq, Hk, L, S) and not dropout:
        # few query rows, many keys: the key range split over programs (fusedformer/kernels/decode.py; no dropout there)
        return decode_forward(query, key, value, attn_mask, 1 if is_causal else 0, scale)
    mask, mask_strides, has_mask, mask_is_bool = _mask_args(attn_mask, query)
    BLOCK_D, BLOCK_DV = _head_blocks(E, Ev)

    def grid(META):
        return flat_grid(triton.cdiv(L, META["BLOCK_M"]), B * Hq, _FN)

    torch.library.wrap_triton(_attn_fwd_kernel)[grid](
        query, key, value, mask, out, lse, seed_dev if dropout else lse, lse, lse,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides, *out.stride(), *lse.stride(),
        Hq, Hq // Hk, L, S, E, Ev, length_bucket(L), length_bucket(S),
        float(scale) * math.log2(math.e), threshold, keep_scale,
        HAS_MASK=has_mask, MASK_IS_BOOL=mask_is_bool, IS_CAUSAL=bool(is_causal), DROPOUT=dropout,
        INTERP_BF16=interp_bf16(query.dtype), PRECISION=dot_precision(query.dtype), VARLEN=False,
        BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
    )  # fmt: skip
    return out, lse


def attention_backward(
    grad_out: torch.Tensor,  # (B, Hq, L, Ev)
    query: torch.Tensor,  # (B, Hq, L, E)
    key: torch.Tensor,  # (B, Hk, S, E)
    value: torch.Tensor,  # (B, Hk, S, Ev)
    out: torch.Tensor,  # (B, Hq, L, Ev) from attention_forward
    logsumexp: torch.Tensor,  # (B, Hq, L) float32 from attention_forward
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,  # as given to attention_forward
    seed: torch.Tensor | None = None,  # as given to attention_forward: the mask is drawn again
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # grad_query, grad_key, grad_value
    """FlashAttention-2 backward: deterministic (no atomics: dK/dV and dQ each have one owner program)."""
    _check(query, key, value, attn_mask)
    seed_dev, threshold, keep_scale, dropout = _dropout_args(float(dropout_p), seed, query.device)
    B, Hq, L, E = query.shape
    Hk, S, Ev = key.shape[1], key.shape[2], value.shape[3]
    if grad_out.shape != (B, Hq, L, Ev) or out.shape != (B, Hq, L, Ev):
        raise ValueError(
            f"{_FN}: expected grad_out and out of shape {(B, Hq, L, Ev)}, "
            f"got {tuple(grad_out.shape)} and {tuple(out.shape)}"
        )
    if logsumexp.shape != (B, Hq, L) or logsumexp.dtype != torch.float32:
        raise ValueError(
            f"{_FN}: expected logsumexp (B, Hq, L) = {(B, Hq, L)} in float32, "
            f"got {tuple(logsumexp.shape)} in {logsumexp.dtype}"
        )
    dq = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    dk = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    dv = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    if B * Hq == 0 or L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    mask, mask_strides, has_mask, mask_is_bool = _mask_args(attn_mask, query)
    renorm = has_mask and not mask_is_bool
    BLOCK_D, BLOCK_DV = _head_blocks(E, Ev)
    qk_scale = float(scale) * math.log2(math.e)
    flags = dict(
        INTERP_BF16=interp_bf16(query.dtype),
        PRECISION=dot_precision(query.dtype),
        BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
    )
    buckets = (length_bucket(L), length_bucket(S))
    seed_arg = seed_dev if dropout else logsumexp
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=query.device)
    inv_z = torch.empty((B, Hq, L), dtype=torch.float32, device=query.device) if renorm else delta

    pre_grid = flat_grid(triton.cdiv(L, _PRE_BLOCK_M), B * Hq, _FN)
    torch.library.wrap_triton(_attn_bwd_preprocess_kernel)[pre_grid](
        out, grad_out, delta, inv_z, query, key, mask, logsumexp, delta, delta,
        *out.stride(), *grad_out.stride(), *query.stride(), *key.stride(), *mask_strides, *logsumexp.stride(),
        Hq, Hq // Hk, L, S, E, Ev, qk_scale, 0,
        RENORM=renorm, IS_CAUSAL=bool(is_causal), VARLEN=False, BLOCK_M=_PRE_BLOCK_M, BLOCK_N=_PRE_BLOCK_N, **flags,
    )  # fmt: skip

    def grid_dkdv(META):
        return flat_grid(triton.cdiv(S, META["BLOCK_N"]), B * Hk, _FN)

    torch.library.wrap_triton(_attn_bwd_dkdv_kernel)[grid_dkdv](
        query, key, value, mask, grad_out, logsumexp, delta, inv_z, dk, dv, seed_arg, delta, delta,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides,
        *grad_out.stride(), *logsumexp.stride(), *dk.stride(), *dv.stride(),
        Hk, Hq // Hk, L, S, E, Ev, *buckets, float(scale), qk_scale, threshold, keep_scale, 0,
        HAS_MASK=has_mask, MASK_IS_BOOL=mask_is_bool, IS_CAUSAL=bool(is_causal), RENORM=renorm,
        DROPOUT=dropout, VARLEN=False, **flags,
    )  # fmt: skip

    def grid_dq(META):
        return flat_grid(triton.cdiv(L, META["BLOCK_M"]), B * Hq, _FN)

    torch.library.wrap_triton(_attn_bwd_dq_kernel)[grid_dq](
        query, key, value, mask, grad_out, logsumexp, delta, inv_z, dq, seed_arg, delta, delta,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides,
        *grad_out.stride(), *logsumexp.stride(), *dq.stride(),
        Hq, Hq // Hk, L, S, E, Ev, *buckets, float(scale), qk_scale, threshold, keep_scale, 0,
        HAS_MASK=has_mask, MASK_IS_BOOL=mask_is_bool, IS_CAUSAL=bool(is_causal), RENORM=renorm,
        DROPOUT=dropout, VARLEN=False, **flags,
    )  # fmt: skip
    return dq, dk, dv


# ---- packed variable-length sequences -----------------------------------------------------------
#
# The same kernels with VARLEN on: program (query block, b·Hq + h) of sequence b reads its bounds from
# cu_seqlens and shifts its pointers to the sequence's first row; the batch strides are 0, L and S are
# the sequence's own lengths (the launch passes the maxima, which size the grid). Blocks past a
# sequence's end visit nothing. Layouts, tokens first: query (total_q, Hq, E), key (total_k, Hk, E),
# value (total_k, Hk, Ev), out (total_q, Hq, Ev), logsumexp (Hq, total_q).


def _check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k) -> None:
    """Raises, naming the argument, on anything these kernels cannot take (shapes, dtypes, devices; the
    lengths' values are checked by fusedformer.ops.varlen before the call)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 3:
            raise ValueError(f"{_FN}: expected {name} to be 3-D (total, H, E), got shape {tuple(t.shape)}")
    _check(*(t.transpose(0, 1).unsqueeze(0) for t in (query, key, value)), None)  # as (1, H, total, E)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != query.device:
            raise ValueError(f"{_FN}: expected {name} int32 (B + 1,) on {query.device}, got {cu.dtype} "
                             f"{tuple(cu.shape)} on {cu.device}")  # fmt: skip
    if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 1:
        raise ValueError(f"{_FN}: expected cu_seqlens_q and cu_seqlens_k of one length B + 1 >= 1")


def _packed_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(total, H, D) read as (batch, head, row, col) with batch stride 0: rows offset per sequence."""
    return 0, t.stride(1), t.stride(0), t.stride(2)


def varlen_attention_forward(
    query: torch.Tensor,  # (total_q, Hq, E)
    key: torch.Tensor,  # (total_k, Hk, E)
    value: torch.Tensor,  # (total_k, Hk, Ev)
    cu_seqlens_q: torch.Tensor,  # (B + 1,) int32
    cu_seqlens_k: torch.Tensor,  # (B + 1,) int32
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # out (total_q, Hq, Ev); logsumexp (Hq, total_q) float32
    """FlashAttention-2 forward over packed sequences (sequence b's queries see its keys only)."""
    _check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k)
    total_q, Hq, E = query.shape
    Hk, Ev = key.shape[1], value.shape[2]
    B = cu_seqlens_q.shape[0] - 1
    out = torch.empty((total_q, Hq, Ev), dtype=query.dtype, device=query.device)
    lse = torch.empty((Hq, total_q), dtype=torch.float32, device=query.device)
    if out.numel() == 0 or B == 0:
        return out, lse
    BLOCK_D, BLOCK_DV = _head_blocks(E, Ev)

    def grid(META):
        return flat_grid(triton.cdiv(max_seqlen_q, META["BLOCK_M"]), B * Hq, _FN)

    # no dropout here (the backends decline varlen dropout on Triton): Seed unused, DROPOUT off
    torch.library.wrap_triton(_attn_fwd_kernel)[grid](
        query, key, value, query, out, lse, lse, cu_seqlens_q, cu_seqlens_k,
        *_packed_strides(query), *_packed_strides(key), *_packed_strides(value), 0, 0, 0, 0,
        *_packed_strides(out), 0, lse.stride(0), lse.stride(1),
        Hq, Hq // Hk, max_seqlen_q, max_seqlen_k, E, Ev, length_bucket(max_seqlen_q), length_bucket(max_seqlen_k),
        float(scale) * math.log2(math.e), 0, 1.0,
        HAS_MASK=False, MASK_IS_BOOL=False, IS_CAUSAL=bool(is_causal), DROPOUT=False,
        INTERP_BF16=interp_bf16(query.dtype), PRECISION=dot_precision(query.dtype), VARLEN=True,
        BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
    )  # fmt: skip
    return out, lse


def varlen_attention_backward(
    grad_out: torch.Tensor,  # (total_q, Hq, Ev)
    query: torch.Tensor,  # (total_q, Hq, E)
    key: torch.Tensor,  # (total_k, Hk, E)
    value: torch.Tensor,  # (total_k, Hk, Ev)
    out: torch.Tensor,  # (total_q, Hq, Ev) from varlen_attention_forward
    logsumexp: torch.Tensor,  # (Hq, total_q) float32 from varlen_attention_forward
    cu_seqlens_q: torch.Tensor,  # (B + 1,) int32
    cu_seqlens_k: torch.Tensor,  # (B + 1,) int32
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # grad_query, grad_key, grad_value
    """FlashAttention-2 backward over packed sequences; deterministic, as attention_backward."""
    _check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k)
    total_q, Hq, E = query.shape
    total_k, Hk, Ev = key.shape[0], key.shape[1], value.shape[2]
    B = cu_seqlens_q.shape[0] - 1
    if grad_out.shape != (total_q, Hq, Ev) or out.shape != (total_q, Hq, Ev):
        raise ValueError(
            f"{_FN}: expected grad_out and out of shape {(total_q, Hq, Ev)}, "
            f"got {tuple(grad_out.shape)} and {tuple(out.shape)}"
        )
    if logsumexp.shape != (Hq, total_q) or logsumexp.dtype != torch.float32:
        raise ValueError(
            f"{_FN}: expected logsumexp (Hq, total_q) = {(Hq, total_q)} in float32, "
            f"got {tuple(logsumexp.shape)} in {logsumexp.dtype}"
        )
    dq = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    dk = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    dv = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    if B == 0 or total_q == 0 or total_k == 0 or Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    BLOCK_D, BLOCK_DV = _head_blocks(E, Ev)
    qk_scale = float(scale) * math.log2(math.e)
    flags = dict(
        INTERP_BF16=interp_bf16(query.dtype),
        PRECISION=dot_precision(query.dtype),
        BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
        VARLEN=True,
    )
    buckets = (length_bucket(max_seqlen_q), length_bucket(max_seqlen_k))
    delta = torch.empty((Hq, total_q), dtype=torch.float32, device=query.device)
    lse_strides = (0, logsumexp.stride(0), logsumexp.stride(1))
    cu = (cu_seqlens_q, cu_seqlens_k)

    pre_grid = flat_grid(triton.cdiv(max_seqlen_q, _PRE_BLOCK_M), B * Hq, _FN)
    torch.library.wrap_triton(_attn_bwd_preprocess_kernel)[pre_grid](
        out, grad_out, delta, delta, query, key, query, logsumexp, *cu,
        *_packed_strides(out), *_packed_strides(grad_out), *_packed_strides(query), *_packed_strides(key),
        0, 0, 0, 0, *lse_strides,
        Hq, Hq // Hk, max_seqlen_q, max_seqlen_k, E, Ev, qk_scale, total_q,
        RENORM=False, IS_CAUSAL=bool(is_causal), BLOCK_M=_PRE_BLOCK_M, BLOCK_N=_PRE_BLOCK_N, **flags,
    )  # fmt: skip

    def grid_dkdv(META):
        return flat_grid(triton.cdiv(max_seqlen_k, META["BLOCK_N"]), B * Hk, _FN)

    torch.library.wrap_triton(_attn_bwd_dkdv_kernel)[grid_dkdv](
        query, key, value, query, grad_out, logsumexp, delta, delta, dk, dv, logsumexp, *cu,
        *_packed_strides(query), *_packed_strides(key), *_packed_strides(value), 0, 0, 0, 0,
        *_packed_strides(grad_out), *lse_strides, *_packed_strides(dk), *_packed_strides(dv),
        Hk, Hq // Hk, max_seqlen_q, max_seqlen_k, E, Ev, *buckets, float(scale), qk_scale, 0, 1.0, total_q,
        HAS_MASK=False, MASK_IS_BOOL=False, IS_CAUSAL=bool(is_causal), RENORM=False, DROPOUT=False, **flags,
    )  # fmt: skip

    def grid_dq(META):
        return flat_grid(triton.cdiv(max_seqlen_q, META["BLOCK_M"]), B * Hq, _FN)

    torch.library.wrap_triton(_attn_bwd_dq_kernel)[grid_dq](
        query, key, value, query, grad_out, logsumexp, delta, delta, dq, logsumexp, *cu,
        *_packed_strides(query), *_packed_strides(key), *_packed_strides(value), 0, 0, 0, 0,
        *_packed_strides(grad_out), *lse_strides, *_packed_strides(dq),
        Hq, Hq // Hk, max_seqlen_q, max_seqlen_k, E, Ev, *buckets, float(scale), qk_scale, 0, 1.0, total_q,
        HAS_MASK=False, MASK_IS_BOOL=False, IS_CAUSAL=bool(is_causal), RENORM=False, DROPOUT=False, **flags,
    )  # fmt: skip
    return dq, dk, dv
