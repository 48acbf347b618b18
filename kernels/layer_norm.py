"""LayerNorm in Triton, forward and backward (Triton tutorial 05 / Liger-Kernel shape).

The input ``(*, D1..Dk)`` is viewed as ``(N, D)`` rows, ``D = D1·…·Dk``. A program normalises ``ROWS``
rows at once (several for narrow rows). A row of up to ``MAX_BLOCK_D`` elements is read once and kept
in registers; a wider row is streamed in ``MAX_BLOCK_D`` chunks (two passes for the statistics, one
for the output). Statistics and all math in float32, float64 for float64 input; ``mean`` and ``rstd``
are saved in that dtype.

Backward: ``G`` programs each take every G-th tile of rows, write ``dx`` for them and keep their part
of ``dweight = Σ dy·x̂`` and ``dbias = Σ dy`` in registers; a second small kernel sums the ``(G, D)``
partials in a fixed order. Wide rows take two launches: the row means ``c1``, ``c2`` below, per row;
then ``G × chunks`` programs, each owning one column chunk of every G-th row tile. No atomics, and in
no launch is a global location both written and read: race-free by construction and deterministic.

    x̂ = (x - mean)·rstd,   y = x̂·w + b
    dx = rstd·(w·dy - mean_D(w·dy·x̂)·x̂ - mean_D(w·dy))
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from fusedformer.kernels._common import (
    INTERPRET,
    interp_bf16,
    num_partials,
    round_to,
    rsqrt_rn,
    sum_rows,
    tune_configs,
    widen,
)

__all__ = ["layer_norm_forward", "layer_norm_backward", "MAX_BLOCK_D"]

# Widest row kept in registers; wider rows are streamed in chunks of this size. Small under the
# interpreter so that the tests reach the chunked path with affordable sizes.
MAX_BLOCK_D = 256 if INTERPRET else 8192


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"ROWS": 8}, num_warps=4)]
    full = [triton.Config({"ROWS": r}, num_warps=w) for r in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8, 16)]
    # quick/off: the prune keeps what suits D among these (or the first)
    quick = [triton.Config({"ROWS": r}, num_warps=w) for r, w in ((1, 8), (4, 4), (16, 4), (2, 16))]
    return tune_configs(full, quick)


def _prune(configs, named_args, **kwargs):
    # tiles of about 1K to 8K elements, at least 32 elements per thread group of a warp
    tile = kwargs["BLOCK_D"]
    kept = [
        c
        for c in configs
        if min(1024, tile) <= c.kwargs["ROWS"] * tile <= max(8192, tile)
        and c.num_warps * 32 <= c.kwargs["ROWS"] * tile
    ]
    return kept or [configs[0]]


# ---- kernels ------------------------------------------------------------------------------------


@triton.autotune(configs=_configs(), key=["D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (N, D)
    W,  # (D,); unused without HAS_WEIGHT
    B,  # (D,); unused without HAS_BIAS
    Y,  # (N, D), contiguous
    Mean,  # (N,) float32 (float64 for float64 input)
    Rstd,  # (N,) like Mean
    N,
    D,
    stride_xn,
    stride_xd,
    eps_hi,  # eps = eps_hi + eps_lo: Triton passes floats as float32, float64 rows need the rest
    eps_lo,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # D <= BLOCK_D: the row stays in registers
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    ACC: tl.constexpr = Mean.dtype.element_ty
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    mask_r = rows < N
    x_ptrs = X + rows[:, None] * stride_xn
    y_ptrs = Y + rows[:, None] * D
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (cols[None, :] < D)
        x = widen(tl.load(x_ptrs + cols[None, :] * stride_xd, mask=mask, other=0.0), ACC)
        # mean, then the variance of the centred row (two-pass: no cancellation)
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, 1) / D
        rstd = rsqrt_rn((var + eps_hi) + eps_lo)
        y = xc * rstd[:, None]
        if HAS_WEIGHT:
            y *= widen(tl.load(W + cols, mask=cols < D, other=0.0), ACC)[None, :]
        if HAS_BIAS:
            y += widen(tl.load(B + cols, mask=cols < D, other=0.0), ACC)[None, :]
        tl.store(y_ptrs + cols[None, :], round_to(y, Y.dtype.element_ty, INTERP_BF16), mask=mask)
    else:
        # a wide row: one pass for the mean, one for the variance, one for the output
        acc = tl.zeros((ROWS, BLOCK_D), dtype=ACC)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = mask_r[:, None] & (cols[None, :] < D)
            acc += widen(tl.load(x_ptrs + cols[None, :] * stride_xd, mask=mask, other=0.0), ACC)
        mean = tl.sum(acc, 1) / D
        acc = tl.zeros((ROWS, BLOCK_D), dtype=ACC)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = mask_r[:, None] & (cols[None, :] < D)
            x = widen(tl.load(x_ptrs + cols[None, :] * stride_xd, mask=mask, other=0.0), ACC)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += xc * xc
        var = tl.sum(acc, 1) / D
        rstd = rsqrt_rn((var + eps_hi) + eps_lo)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = mask_r[:, None] & (cols[None, :] < D)
            x = widen(tl.load(x_ptrs + cols[None, :] * stride_xd, mask=mask, other=0.0), ACC)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                y *= widen(tl.load(W + cols, mask=cols < D, other=0.0), ACC)[None, :]
            if HAS_BIAS:
                y += widen(tl.load(B + cols, mask=cols < D, other=0.0), ACC)[None, :]
            tl.store(y_ptrs + cols[None, :], round_to(y, Y.dtype.element_ty, INTERP_BF16), mask=mask)
    tl.store(Mean + rows, mean, mask=mask_r)
    tl.store(Rstd + rows, rstd, mask=mask_r)


@triton.jit
def _bwd_tile(
    DY, X, Mean, Rstd,
    w,  # (BLOCK_D,) the weight's columns in ACC; unused without HAS_WEIGHT
    rows, cols, mask_r, mask_c,
    stride_dyn, stride_dyd, stride_xn, stride_xd,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One (rows, cols) tile of the backward's operands in ACC: (x̂, dy, w·dy, rstd), 0 outside the tile."""
    mask = mask_r[:, None] & mask_c[None, :]
    x = widen(tl.load(X + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0), ACC)
    dy = widen(tl.load(DY + rows[:, None] * stride_dyn + cols[None, :] * stride_dyd, mask=mask, other=0.0), ACC)
    mean = tl.load(Mean + rows, mask=mask_r, other=0.0)
    rstd = tl.load(Rstd + rows, mask=mask_r, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dy
    if HAS_WEIGHT:
        wdy = dy * w[None, :]
    return xhat, dy, wdy, rstd


@triton.jit
def _bwd_dx(
    DX, rows, cols, mask_r, mask_c, D,
    xhat, dy, wdy, rstd,
    c1, c2,  # (ROWS,) the row means of w·dy·x̂ and of w·dy
    dw, db,  # (BLOCK_D,) this program's partial sums, returned updated
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr,
):  # fmt: skip
    """Stores dx = rstd·(w·dy - c1·x̂ - c2) for the tile; adds its dweight and dbias parts to dw, db."""
    dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    dx = round_to(dx, DX.dtype.element_ty, INTERP_BF16)
    tl.store(DX + rows[:, None] * D + cols[None, :], dx, mask=mask_r[:, None] & mask_c[None, :])
    if HAS_WEIGHT:
        dw += tl.sum(dy * xhat, 0)
    if HAS_BIAS:
        db += tl.sum(dy, 0)
    return dw, db


@triton.autotune(configs=_configs(), key=["D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _layer_norm_bwd_row_kernel(
    DY,  # (N, D)
    X,  # (N, D)
    W,  # (D,); unused without HAS_WEIGHT
    Mean,  # (N,) float32 (float64 for float64 input)
    Rstd,  # (N,) like Mean
    C1,  # (N,) like Mean, contiguous: mean_D(w·dy·x̂)
    C2,  # (N,) like Mean, contiguous: mean_D(w·dy)
    N,
    D,
    stride_dyn,
    stride_dyd,
    stride_xn,
    stride_xd,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    # wide rows, pass 1: each program streams its ROWS rows chunk by chunk for their c1 and c2
    ACC: tl.constexpr = Mean.dtype.element_ty
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    mask_r = rows < N
    acc1 = tl.zeros((ROWS, BLOCK_D), dtype=ACC)
    acc2 = tl.zeros((ROWS, BLOCK_D), dtype=ACC)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask_c = cols < D
        w = 0.0
        if HAS_WEIGHT:
            w = widen(tl.load(W + cols, mask=mask_c, other=0.0), ACC)
        xhat, _dy, wdy, _rstd = _bwd_tile(
            DY, X, Mean, Rstd, w, rows, cols, mask_r, mask_c, stride_dyn, stride_dyd, stride_xn, stride_xd,
            HAS_WEIGHT, ACC,
        )  # fmt: skip
        acc1 += wdy * xhat
        acc2 += wdy
    tl.store(C1 + rows, tl.sum(acc1, 1) / D, mask=mask_r)
    tl.store(C2 + rows, tl.sum(acc2, 1) / D, mask=mask_r)


@triton.autotune(configs=_configs(), key=["D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (N, D)
    X,  # (N, D)
    W,  # (D,); unused without HAS_WEIGHT
    Mean,  # (N,) float32 (float64 for float64 input)
    Rstd,  # (N,) like Mean
    C1,  # (N,) like Mean, from _layer_norm_bwd_row_kernel; unused with SINGLE_BLOCK
    C2,  # (N,) like Mean, from _layer_norm_bwd_row_kernel; unused with SINGLE_BLOCK
    DX,  # (N, D), contiguous
    DWPartial,  # (G, D) like Mean, contiguous; unused without HAS_WEIGHT
    DBPartial,  # (G, D) like Mean, contiguous; unused without HAS_BIAS
    N,
    D,
    G,
    stride_dyn,
    stride_dyd,
    stride_xn,
    stride_xd,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # D <= BLOCK_D: c1 and c2 come from the tile, one column chunk
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    # program (c, g) owns column chunk c of the row tiles g, g + G, g + 2G, ... (wide rows: pass 2)
    #
    # Race-free by construction: in this launch every location of DX and of the partials has exactly
    # one writer, and none is read. dx[r, cols] is written only by program (chunk of cols, tile of r
    # mod G); DWPartial[g, cols] and DBPartial[g, cols] only by program (chunk of cols, g), once, from
    # registers, and summed by sum_rows in the next launch. C1 and C2 were written by the previous launch,
    # and a launch boundary orders them.
    # (The earlier single-kernel version kept the partials in global memory and read them back in the
    # next row tile: correct only if the same thread wrote and read each element, which nothing in
    # Triton promises across differently laid-out tiles, and the interpreter could never show a race.)
    ACC: tl.constexpr = Mean.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    g = tl.program_id(1)
    mask_c = cols < D
    w = 0.0
    if HAS_WEIGHT:
        w = widen(tl.load(W + cols, mask=mask_c, other=0.0), ACC)
    dw = tl.zeros((BLOCK_D,), dtype=ACC)
    db = tl.zeros((BLOCK_D,), dtype=ACC)
    for r0 in range(g * ROWS, N, G * ROWS):
        rows = (r0 + tl.arange(0, ROWS)).to(tl.int64)
        mask_r = rows < N
        xhat, dy, wdy, rstd = _bwd_tile(
            DY, X, Mean, Rstd, w, rows, cols, mask_r, mask_c, stride_dyn, stride_dyd, stride_xn, stride_xd,
            HAS_WEIGHT, ACC,
        )  # fmt: skip
        if SINGLE_BLOCK:  # the whole row is in the tile
            c1 = tl.sum(wdy * xhat, 1) / D
            c2 = tl.sum(wdy, 1) / D
        else:
            c1 = tl.load(C1 + rows, mask=mask_r, other=0.0)
            c2 = tl.load(C2 + rows, mask=mask_r, other=0.0)
        dw, db = _bwd_dx(
            DX, rows, cols, mask_r, mask_c, D, xhat, dy, wdy, rstd, c1, c2, dw, db,
            HAS_WEIGHT, HAS_BIAS, INTERP_BF16,
        )  # fmt: skip
    if HAS_WEIGHT:
        tl.store(DWPartial + g * D + cols, dw, mask=mask_c)
    if HAS_BIAS:
        tl.store(DBPartial + g * D + cols, db, mask=mask_c)


# ---- launchers ----------------------------------------------------------------------------------

_FN = "fusedformer.kernels.layer_norm"


def _check(input, normalized_shape, weight, bias) -> tuple[int, int]:
    """Returns (N, D); raises, naming the argument, on anything LayerNorm cannot take."""
    if input.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{_FN}: expected input of a floating dtype, got {input.dtype}")
    shape = tuple(int(s) for s in normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k :]) != shape:
        raise ValueError(
            f"{_FN}: normalized_shape {list(shape)} does not match the last dims of input "
            f"{tuple(input.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{_FN}: expected {name} of shape {list(shape)}, got {tuple(t.shape)}")
        if t.dtype != input.dtype or t.device != input.device:
            raise TypeError(
                f"{_FN}: expected {name} of input's dtype and device ({input.dtype}, {input.device}), "
                f"got {t.dtype} on {t.device}"
            )
    D = math.prod(shape)
    N = math.prod(input.shape[: input.dim() - k])
    return N, D


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(D: int) -> tuple[int, bool]:
    """(BLOCK_D, SINGLE_BLOCK) for rows of D elements."""
    block = triton.next_power_of_2(max(D, 1))
    return (block, True) if block <= MAX_BLOCK_D else (MAX_BLOCK_D, False)


def _flat(t: torch.Tensor | None, D: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(D).contiguous()


def layer_norm_forward(
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: list[int],  # (D1..Dk)
    weight: torch.Tensor | None,  # (D1..Dk)
    bias: torch.Tensor | None,  # (D1..Dk)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # out (*, D1..Dk), mean (*), rstd (*)
    """``F.layer_norm``; also returns ``mean`` and ``rstd`` (float32, float64 for float64 input)."""
    N, D = _check(input, normalized_shape, weight, bias)
    lead = input.shape[: input.dim() - len(normalized_shape)]
    stats = _stats_dtype(input.dtype)
    y = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    mean = torch.empty(lead, dtype=stats, device=input.device)
    rstd = torch.empty(lead, dtype=stats, device=input.device)
    if N == 0:
        return y, mean, rstd
    if D == 0:  # as torch: the statistics of an empty row are NaN
        return y, mean.fill_(math.nan), rstd.fill_(math.nan)
    x = input.reshape(N, D)  # a view where the strides allow
    w, b = _flat(weight, D), _flat(bias, D)
    BLOCK_D, single = _blocks(D)
    eps_hi = struct.unpack("f", struct.pack("f", float(eps)))[0]  # eps rounded to float32

    def grid(META):
        return (triton.cdiv(N, META["ROWS"]),)

    torch.library.wrap_triton(_layer_norm_fwd_kernel)[grid](
        x, w if w is not None else x, b if b is not None else x, y, mean, rstd,
        N, D, x.stride(0), x.stride(1), eps_hi, float(eps) - eps_hi,
        HAS_WEIGHT=w is not None, HAS_BIAS=b is not None, INTERP_BF16=interp_bf16(input.dtype),
        SINGLE_BLOCK=single, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return y, mean, rstd


def layer_norm_backward(
    grad_out: torch.Tensor,  # (*, D1..Dk)
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: list[int],  # (D1..Dk)
    mean: torch.Tensor,  # (*) from layer_norm_forward
    rstd: torch.Tensor,  # (*) from layer_norm_forward
    weight: torch.Tensor | None,  # (D1..Dk)
    bias: torch.Tensor | None,  # (D1..Dk)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # grad_input; grad_weight, grad_bias or (0,)
    """Gradients of ``F.layer_norm``; weight and bias gradients reduced deterministically (no atomics)."""
    N, D = _check(input, normalized_shape, weight, bias)
    if grad_out.shape != input.shape:
        raise ValueError(
            f"{_FN}: expected grad_out of input's shape {tuple(input.shape)}, got {tuple(grad_out.shape)}"
        )
    if mean.numel() != N or rstd.numel() != N:
        raise ValueError(
            f"{_FN}: expected mean and rstd with {N} elements, got {mean.numel()} and {rstd.numel()}"
        )
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    empty = input.new_empty((0,))
    if N == 0 or D == 0:
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if weight is not None else empty
        db = torch.zeros_like(bias, memory_format=torch.contiguous_format) if bias is not None else empty
        return dx, dw, db
    stats = _stats_dtype(input.dtype)
    x, dy = input.reshape(N, D), grad_out.reshape(N, D)
    mean = mean.reshape(N).to(stats).contiguous()
    rstd = rstd.reshape(N).to(stats).contiguous()
    w = _flat(weight, D)
    BLOCK_D, single = _blocks(D)
    G = num_partials(input.device, cap=N)
    dw_part = torch.empty((G, D), dtype=stats, device=input.device) if weight is not None else mean
    db_part = torch.empty((G, D), dtype=stats, device=input.device) if bias is not None else mean
    w_arg = w if w is not None else x
    c1 = c2 = mean  # unused on one column chunk
    if not single:  # wide rows: c1, c2 per row first (_layer_norm_bwd_row_kernel)
        c1 = torch.empty((N,), dtype=stats, device=input.device)
        c2 = torch.empty((N,), dtype=stats, device=input.device)

        def grid_rows(META):
            return (triton.cdiv(N, META["ROWS"]),)

        torch.library.wrap_triton(_layer_norm_bwd_row_kernel)[grid_rows](
            dy, x, w_arg, mean, rstd, c1, c2,
            N, D, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            HAS_WEIGHT=w is not None, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    torch.library.wrap_triton(_layer_norm_bwd_kernel)[(triton.cdiv(D, BLOCK_D), G)](
        dy, x, w_arg, mean, rstd, c1, c2, dx, dw_part, db_part,
        N, D, G, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        HAS_WEIGHT=w is not None, HAS_BIAS=bias is not None, INTERP_BF16=interp_bf16(input.dtype),
        SINGLE_BLOCK=single, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    dw = sum_rows(dw_part, weight.dtype).reshape(weight.shape) if weight is not None else empty
    db = sum_rows(db_part, bias.dtype).reshape(bias.shape) if bias is not None else empty
    return dx, dw, db
