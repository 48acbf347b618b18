"""LayerNorm and RMSNorm in Triton, forward and backward, each alone or after a residual add
(Triton tutorial 05 / Liger-Kernel shape; FlashAttention's ``dropout_add_layer_norm`` without dropout).

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
    RMSNorm (IS_RMS): mean = 0 and no mean_D(w·dy) term; no bias.

Residual add (HAS_RESIDUAL): the forward normalises h = x + residual, rounded to the dtype (what the
composite normalises) and stored as residual_out; the streamed path recomputes h from x and residual
in each pass rather than reading back what it stored. The backward takes h as its x and adds
grad_residual_out (HAS_DRES) to dx, which is then the gradient of both input and residual. Dropout on
the input has no Triton kernel (the backends send such calls to the reference path).
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

__all__ = [
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
    "add_layer_norm_forward",
    "add_layer_norm_backward",
    "add_rms_norm_forward",
    "add_rms_norm_backward",
    "MAX_BLOCK_D",
]

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


@triton.jit
def _load_h(
    x_ptrs,  # (ROWS, BLOCK_D) pointers into X
    r_ptrs,  # (ROWS, BLOCK_D) pointers into R, contiguous rows; unused without HAS_RESIDUAL
    mask,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    """The rows to normalise, as ACC: x, or h = x + residual rounded to DTYPE (what the composite holds)."""
    x = widen(tl.load(x_ptrs, mask=mask, other=0.0), ACC)
    if HAS_RESIDUAL:
        x = widen(round_to(x + widen(tl.load(r_ptrs, mask=mask, other=0.0), ACC), DTYPE, INTERP_BF16), ACC)
    return x


@triton.autotune(configs=_configs(), key=["D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (N, D)
    R,  # (N, D) contiguous; unused without HAS_RESIDUAL
    W,  # (D,); unused without HAS_WEIGHT
    B,  # (D,); unused without HAS_BIAS
    Y,  # (N, D), contiguous
    H,  # (N, D) contiguous: residual_out = x + residual; unused without HAS_RESIDUAL
    Mean,  # (N,) float32 (float64 for float64 input); unused with IS_RMS
    Rstd,  # (N,) like Mean
    N,
    D,
    stride_xn,
    stride_xd,
    eps_hi,  # eps = eps_hi + eps_lo: Triton passes floats as float32, float64 rows need the rest
    eps_lo,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IS_RMS: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # D <= BLOCK_D: the row stays in registers
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    ACC: tl.constexpr = Rstd.dtype.element_ty
    DTYPE: tl.constexpr = Y.dtype.element_ty
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    mask_r = rows < N
    x_ptrs = X + rows[:, None] * stride_xn
    r_ptrs = R + rows[:, None] * D
    y_ptrs = Y + rows[:, None] * D
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (cols[None, :] < D)
        x = _load_h(
            x_ptrs + cols[None, :] * stride_xd, r_ptrs + cols[None, :], mask, DTYPE, ACC, HAS_RESIDUAL, INTERP_BF16
        )
        if HAS_RESIDUAL:
            tl.store(H + rows[:, None] * D + cols[None, :], round_to(x, DTYPE, INTERP_BF16), mask=mask)
        if IS_RMS:
            mean = tl.zeros((ROWS,), dtype=ACC)
            xc = x
        else:
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
        # a wide row: one pass for the mean (LayerNorm; it also stores h), one for the variance (or
        # mean square), one for the output
        mean = tl.zeros((ROWS,), dtype=ACC)
        if not IS_RMS:
            acc = tl.zeros((ROWS, BLOCK_D), dtype=ACC)
            for c0 in range(0, D, BLOCK_D):
                cols = c0 + tl.arange(0, BLOCK_D)
                mask = mask_r[:, None] & (cols[None, :] < D)
                x = _load_h(x_ptrs + cols[None, :] * stride_xd, r_ptrs + cols[None, :], mask, DTYPE, ACC,
                            HAS_RESIDUAL, INTERP_BF16)  # fmt: skip
                if HAS_RESIDUAL:
                    tl.store(H + rows[:, None] * D + cols[None, :], round_to(x, DTYPE, INTERP_BF16), mask=mask)
                acc += x
            mean = tl.sum(acc, 1) / D
        acc = tl.zeros((ROWS, BLOCK_D), dtype=ACC)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = mask_r[:, None] & (cols[None, :] < D)
            x = _load_h(x_ptrs + cols[None, :] * stride_xd, r_ptrs + cols[None, :], mask, DTYPE, ACC,
                        HAS_RESIDUAL, INTERP_BF16)  # fmt: skip
            if IS_RMS and HAS_RESIDUAL:
                tl.store(H + rows[:, None] * D + cols[None, :], round_to(x, DTYPE, INTERP_BF16), mask=mask)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += xc * xc
        var = tl.sum(acc, 1) / D
        rstd = rsqrt_rn((var + eps_hi) + eps_lo)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = mask_r[:, None] & (cols[None, :] < D)
            x = _load_h(x_ptrs + cols[None, :] * stride_xd, r_ptrs + cols[None, :], mask, DTYPE, ACC,
                        HAS_RESIDUAL, INTERP_BF16)  # fmt: skip
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                y *= widen(tl.load(W + cols, mask=cols < D, other=0.0), ACC)[None, :]
            if HAS_BIAS:
                y += widen(tl.load(B + cols, mask=cols < D, other=0.0), ACC)[None, :]
            tl.store(y_ptrs + cols[None, :], round_to(y, Y.dtype.element_ty, INTERP_BF16), mask=mask)
    if not IS_RMS:
        tl.store(Mean + rows, mean, mask=mask_r)
    tl.store(Rstd + rows, rstd, mask=mask_r)


@triton.jit
def _bwd_tile(
    DY, X, Mean, Rstd,
    w,  # (BLOCK_D,) the weight's columns in ACC; unused without HAS_WEIGHT
    rows, cols, mask_r, mask_c,
    stride_dyn, stride_dyd, stride_xn, stride_xd,
    HAS_WEIGHT: tl.constexpr, IS_RMS: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One (rows, cols) tile of the backward's operands in ACC: (x̂, dy, w·dy, rstd), 0 outside the tile
    (RMSNorm: mean 0, Mean not read)."""
    mask = mask_r[:, None] & mask_c[None, :]
    x = widen(tl.load(X + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask, other=0.0), ACC)
    dy = widen(tl.load(DY + rows[:, None] * stride_dyn + cols[None, :] * stride_dyd, mask=mask, other=0.0), ACC)
    rstd = tl.load(Rstd + rows, mask=mask_r, other=0.0)
    if IS_RMS:
        mean = tl.zeros_like(rstd)
    else:
        mean = tl.load(Mean + rows, mask=mask_r, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dy
    if HAS_WEIGHT:
        wdy = dy * w[None, :]
    return xhat, dy, wdy, rstd


@triton.jit
def _bwd_dx(
    DX, DRES, rows, cols, mask_r, mask_c, D,
    xhat, dy, wdy, rstd,
    c1, c2,  # (ROWS,) the row means of w·dy·x̂ and of w·dy (RMSNorm: c2 = 0)
    dw, db,  # (BLOCK_D,) this program's partial sums, returned updated
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRES: tl.constexpr, INTERP_BF16: tl.constexpr,
):  # fmt: skip
    """Stores dx = rstd·(w·dy - c1·x̂ - c2) (+ dres with HAS_DRES) for the tile; adds its dweight and dbias
    parts to dw, db."""
    mask = mask_r[:, None] & mask_c[None, :]
    dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    if HAS_DRES:
        dx += widen(tl.load(DRES + rows[:, None] * D + cols[None, :], mask=mask, other=0.0), dx.dtype)
    dx = round_to(dx, DX.dtype.element_ty, INTERP_BF16)
    tl.store(DX + rows[:, None] * D + cols[None, :], dx, mask=mask)
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
    C2,  # (N,) like Mean, contiguous: mean_D(w·dy) (0 with IS_RMS)
    N,
    D,
    stride_dyn,
    stride_dyd,
    stride_xn,
    stride_xd,
    HAS_WEIGHT: tl.constexpr,
    IS_RMS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    # wide rows, pass 1: each program streams its ROWS rows chunk by chunk for their c1 and c2
    ACC: tl.constexpr = Rstd.dtype.element_ty
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
            HAS_WEIGHT, IS_RMS, ACC,
        )  # fmt: skip
        acc1 += wdy * xhat
        if not IS_RMS:
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
    DRES,  # (N, D) contiguous: grad of residual_out, added to dx; unused without HAS_DRES
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
    HAS_DRES: tl.constexpr,
    IS_RMS: tl.constexpr,
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
    # and a launch boundary orders them. DRES is only read, and only by the one writer of dx there.
    # (The earlier single-kernel version kept the partials in global memory and read them back in the
    # next row tile: correct only if the same thread wrote and read each element, which nothing in
    # Triton promises across differently laid-out tiles, and the interpreter could never show a race.)
    ACC: tl.constexpr = Rstd.dtype.element_ty
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
            HAS_WEIGHT, IS_RMS, ACC,
        )  # fmt: skip
        if SINGLE_BLOCK:  # the whole row is in the tile
            c1 = tl.sum(wdy * xhat, 1) / D
            if IS_RMS:
                c2 = tl.zeros((ROWS,), dtype=ACC)
            else:
                c2 = tl.sum(wdy, 1) / D
        else:
            c1 = tl.load(C1 + rows, mask=mask_r, other=0.0)
            c2 = tl.load(C2 + rows, mask=mask_r, other=0.0)
        dw, db = _bwd_dx(
            DX, DRES, rows, cols, mask_r, mask_c, D, xhat, dy, wdy, rstd, c1, c2, dw, db,
            HAS_WEIGHT, HAS_BIAS, HAS_DRES, INTERP_BF16,
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


def _norm_forward(input, residual, normalized_shape, weight, bias, eps, rms: bool):
    """(out, residual_out or None, mean or None, rstd) of LayerNorm / RMSNorm of input (+ residual)."""
    N, D = _check(input, normalized_shape, weight, bias)
    if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype):
        raise ValueError(
            f"{_FN}: expected residual of input's shape and dtype {tuple(input.shape)} {input.dtype}, got "
            f"{tuple(residual.shape)} {residual.dtype}"
        )
    lead = input.shape[: input.dim() - len(normalized_shape)]
    stats = _stats_dtype(input.dtype)
    y = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    h = torch.empty(input.shape, dtype=input.dtype, device=input.device) if residual is not None else None
    mean = None if rms else torch.empty(lead, dtype=stats, device=input.device)
    rstd = torch.empty(lead, dtype=stats, device=input.device)
    if N == 0:
        return y, h, mean, rstd
    if D == 0:  # as torch: an empty row's mean is 0 and its rstd 1/sqrt(0/0 + eps) = NaN
        return y, h, mean.zero_() if mean is not None else None, rstd.fill_(math.nan)
    x = input.reshape(N, D)  # a view where the strides allow
    r = residual.reshape(N, D).contiguous() if residual is not None else None
    w, b = _flat(weight, D), _flat(bias, D)
    BLOCK_D, single = _blocks(D)
    eps_hi = struct.unpack("f", struct.pack("f", float(eps)))[0]  # eps rounded to float32

    def grid(META):
        return (triton.cdiv(N, META["ROWS"]),)

    torch.library.wrap_triton(_layer_norm_fwd_kernel)[grid](
        x, r if r is not None else x, w if w is not None else x, b if b is not None else x, y,
        h if h is not None else y, mean if mean is not None else rstd, rstd,
        N, D, x.stride(0), x.stride(1), eps_hi, float(eps) - eps_hi,
        HAS_WEIGHT=w is not None, HAS_BIAS=b is not None, HAS_RESIDUAL=r is not None, IS_RMS=rms,
        INTERP_BF16=interp_bf16(input.dtype), SINGLE_BLOCK=single, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return y, h, mean, rstd


def _norm_backward(grad_out, grad_residual_out, input, normalized_shape, mean, rstd, weight, bias, rms: bool):
    """(grad_input (with grad_residual_out added), grad_weight or (0,), grad_bias or (0,))."""
    N, D = _check(input, normalized_shape, weight, bias)
    for name, t in (("grad_out", grad_out), ("grad_residual_out", grad_residual_out)):
        if t is not None and t.shape != input.shape:
            raise ValueError(f"{_FN}: expected {name} of input's shape {tuple(input.shape)}, got {tuple(t.shape)}")
    if rstd.numel() != N or (mean is not None and mean.numel() != N):
        raise ValueError(f"{_FN}: expected mean and rstd with {N} elements, got {rstd.numel()}")
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    empty = input.new_empty((0,))
    if N == 0 or D == 0:
        if grad_residual_out is not None:
            dx.copy_(grad_residual_out)
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if weight is not None else empty
        db = torch.zeros_like(bias, memory_format=torch.contiguous_format) if bias is not None else empty
        return dx, dw, db
    stats = _stats_dtype(input.dtype)
    x, dy = input.reshape(N, D), grad_out.reshape(N, D)
    dres = grad_residual_out.to(input.dtype).reshape(N, D).contiguous() if grad_residual_out is not None else None
    rstd = rstd.reshape(N).to(stats).contiguous()
    mean = mean.reshape(N).to(stats).contiguous() if mean is not None else rstd
    w = _flat(weight, D)
    BLOCK_D, single = _blocks(D)
    G = num_partials(input.device, cap=N)
    dw_part = torch.empty((G, D), dtype=stats, device=input.device) if weight is not None else rstd
    db_part = torch.empty((G, D), dtype=stats, device=input.device) if bias is not None else rstd
    w_arg = w if w is not None else x
    c1 = c2 = rstd  # unused on one column chunk
    if not single:  # wide rows: c1, c2 per row first (_layer_norm_bwd_row_kernel)
        c1 = torch.empty((N,), dtype=stats, device=input.device)
        c2 = torch.empty((N,), dtype=stats, device=input.device)

        def grid_rows(META):
            return (triton.cdiv(N, META["ROWS"]),)

        torch.library.wrap_triton(_layer_norm_bwd_row_kernel)[grid_rows](
            dy, x, w_arg, mean, rstd, c1, c2,
            N, D, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            HAS_WEIGHT=w is not None, IS_RMS=rms, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    torch.library.wrap_triton(_layer_norm_bwd_kernel)[(triton.cdiv(D, BLOCK_D), G)](
        dy, x, w_arg, mean, rstd, c1, c2, dres if dres is not None else dx, dx, dw_part, db_part,
        N, D, G, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        HAS_WEIGHT=w is not None, HAS_BIAS=bias is not None, HAS_DRES=dres is not None, IS_RMS=rms,
        INTERP_BF16=interp_bf16(input.dtype), SINGLE_BLOCK=single, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    dw = sum_rows(dw_part, weight.dtype).reshape(weight.shape) if weight is not None else empty
    db = sum_rows(db_part, bias.dtype).reshape(bias.shape) if bias is not None else empty
    return dx, dw, db


def _no_dropout(dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise ValueError(f"{_FN}: the Triton add + norm kernels have no dropout, got dropout_p={dropout_p}")


def layer_norm_forward(
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: list[int],  # (D1..Dk)
    weight: torch.Tensor | None,  # (D1..Dk)
    bias: torch.Tensor | None,  # (D1..Dk)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # out (*, D1..Dk), mean (*), rstd (*)
    """``F.layer_norm``; also returns ``mean`` and ``rstd`` (float32, float64 for float64 input)."""
    y, _, mean, rstd = _norm_forward(input, None, normalized_shape, weight, bias, eps, rms=False)
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
    return _norm_backward(grad_out, None, input, normalized_shape, mean, rstd, weight, bias, rms=False)


def rms_norm_forward(
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: list[int],  # (D1..Dk)
    weight: torch.Tensor | None,  # (D1..Dk)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # out (*, D1..Dk), rstd (*)
    """``F.rms_norm`` (eps given); also returns ``rstd`` (float32, float64 for float64 input)."""
    y, _, _, rstd = _norm_forward(input, None, normalized_shape, weight, None, eps, rms=True)
    return y, rstd


def rms_norm_backward(
    grad_out: torch.Tensor,  # (*, D1..Dk)
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: list[int],  # (D1..Dk)
    rstd: torch.Tensor,  # (*) from rms_norm_forward
    weight: torch.Tensor | None,  # (D1..Dk)
) -> tuple[torch.Tensor, torch.Tensor]:  # grad_input; grad_weight or (0,)
    """Gradients of ``F.rms_norm``."""
    dx, dw, _ = _norm_backward(grad_out, None, input, normalized_shape, None, rstd, weight, None, rms=True)
    return dx, dw


def add_layer_norm_forward(
    input: torch.Tensor,  # (*, D1..Dk)
    residual: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: list[int],  # (D1..Dk)
    weight: torch.Tensor | None,  # (D1..Dk)
    bias: torch.Tensor | None,  # (D1..Dk)
    eps: float,
    dropout_p: float = 0.0,  # must be 0
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # out, residual_out, mean (*), rstd (*)
    """``h = input + residual; (F.layer_norm(h), h, mean, rstd)``."""
    _no_dropout(dropout_p)
    y, h, mean, rstd = _norm_forward(input, residual, normalized_shape, weight, bias, eps, rms=False)
    return y, h, mean, rstd


def add_layer_norm_backward(
    grad_out: torch.Tensor,  # (*, D1..Dk)
    grad_residual_out: torch.Tensor | None,  # (*, D1..Dk)
    residual_out: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: list[int],  # (D1..Dk)
    mean: torch.Tensor,  # (*)
    rstd: torch.Tensor,  # (*)
    weight: torch.Tensor | None,  # (D1..Dk)
    bias: torch.Tensor | None,  # (D1..Dk)
    dropout_p: float = 0.0,  # must be 0
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # grad_residual, (0,), grad_weight, grad_bias
    """Gradients of :func:`add_layer_norm_forward`; grad_input equals grad_residual (returned empty)."""
    _no_dropout(dropout_p)
    dh, dw, db = _norm_backward(
        grad_out, grad_residual_out, residual_out, normalized_shape, mean, rstd, weight, bias, rms=False
    )
    return dh, residual_out.new_empty((0,)), dw, db


def add_rms_norm_forward(
    input: torch.Tensor,  # (*, D1..Dk)
    residual: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: list[int],  # (D1..Dk)
    weight: torch.Tensor | None,  # (D1..Dk)
    eps: float,
    dropout_p: float = 0.0,  # must be 0
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # out, residual_out, rstd (*)
    """``h = input + residual; (F.rms_norm(h), h, rstd)``."""
    _no_dropout(dropout_p)
    y, h, _, rstd = _norm_forward(input, residual, normalized_shape, weight, None, eps, rms=True)
    return y, h, rstd


def add_rms_norm_backward(
    grad_out: torch.Tensor,  # (*, D1..Dk)
    grad_residual_out: torch.Tensor | None,  # (*, D1..Dk)
    residual_out: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: list[int],  # (D1..Dk)
    rstd: torch.Tensor,  # (*)
    weight: torch.Tensor | None,  # (D1..Dk)
    dropout_p: float = 0.0,  # must be 0
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # grad_residual, (0,), grad_weight
    """Gradients of :func:`add_rms_norm_forward`; grad_input equals grad_residual (returned empty)."""
    _no_dropout(dropout_p)
    dh, dw, _ = _norm_backward(
        grad_out, grad_residual_out, residual_out, normalized_shape, None, rstd, weight, None, rms=True
    )
    return dh, residual_out.new_empty((0,)), dw
