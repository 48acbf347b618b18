"""bias + GELU in Triton, forward and backward, exact (erf) and tanh-approximate.

``gelu_forward(input, bias, approximate)`` computes ``gelu(input + bias)`` in one pass;
``gelu_backward`` gives ``grad_input`` and, when there is a bias, ``grad_bias`` (the column sums of
``grad_input``, reduced without atomics: deterministic). Both view the input as ``(N, D)``,
``D = input.shape[-1]``, and tile it ``(BLOCK_R, BLOCK_C)``. Math in float32 (float64 for float64).

    erf:  gelu(x) = x·Φ(x) = x/2·(1 + erf(x/√2)),     gelu'(x) = Φ(x) + x·φ(x)
    tanh: gelu(x) = x/2·(1 + tanh(u)) = x·σ(2u),      u = √(2/π)·(x + 0.044715·x³)
          gelu'(x) = σ(2u) + x·σ(2u)(1 - σ(2u))·2u'

σ(2u) is computed from ``exp(-2|u|)``, which never overflows (no ``tl.math.tanh`` in this Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedformer.kernels._common import (
    INTERPRET,
    div_rn,
    interp_bf16,
    num_partials,
    round_to,
    sum_rows,
    tune_configs,
    widen,
)

__all__ = ["gelu_forward", "gelu_backward"]

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_COEF = tl.constexpr(0.044715)


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_R": 16}, num_warps=4)]
    full = [triton.Config({"BLOCK_R": r}, num_warps=w) for r in (1, 2, 4, 8, 16, 32) for w in (2, 4, 8)]
    quick = [triton.Config({"BLOCK_R": r}, num_warps=w) for r, w in ((4, 4), (16, 8), (1, 4))]
    return tune_configs(full, quick)


def _prune(configs, named_args, **kwargs):
    # tiles of 512 to 8192 elements; BLOCK_C is fixed by D before tuning
    block_c = kwargs["BLOCK_C"]
    kept = [c for c in configs if 512 <= c.kwargs["BLOCK_R"] * block_c <= 8192]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_R"])]


# ---- math ---------------------------------------------------------------------------------------


@triton.jit
def _tanh_sigmoid(x):
    """(σ(2u), σ(2u)·(1 - σ(2u))) for the tanh approximation's u(x)."""
    u = _SQRT_2_OVER_PI * (x + _TANH_COEF * x * x * x)
    e = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]: no overflow for any x
    r = div_rn(1.0, 1.0 + e)
    s = tl.where(u >= 0, r, e * r)
    return s, e * r * r


@triton.jit
def _gelu(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        s, _ = _tanh_sigmoid(x)
        y = x * s
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT2))
    return y


@triton.jit
def _gelu_grad(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        s, sd = _tanh_sigmoid(x)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_COEF * (x * x))  # x² first, as torch
        # multiplied in torch's order: where x³ overflows (|x| > ~7e12) sd is 0 and the term 0, but where
        # x² does too (|x| > ~1.8e19 in float32) du is inf and the term NaN, as torch's backward gives
        g = s + x * sd * 2.0 * du
    else:
        g = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    return g


# ---- kernels ------------------------------------------------------------------------------------


@triton.autotune(configs=_configs(), key=["D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _gelu_fwd_kernel(
    X,  # (N, D)
    Bias,  # (D,); unused without HAS_BIAS
    Y,  # (N, D), contiguous
    N,
    D,
    stride_xn,
    stride_xd,
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r[:, None] < N) & (offs_c[None, :] < D)
    # load, add the bias, gelu, store
    x = tl.load(X + offs_r[:, None] * stride_xn + offs_c[None, :] * stride_xd, mask=mask, other=0.0)
    x = widen(x, ACC)
    if HAS_BIAS:
        x += widen(tl.load(Bias + offs_c, mask=offs_c < D, other=0.0), ACC)[None, :]
    y = _gelu(x, APPROX_TANH)
    y = round_to(y, Y.dtype.element_ty, INTERP_BF16)
    tl.store(Y + offs_r[:, None] * D + offs_c[None, :], y, mask=mask)


@triton.autotune(configs=_configs(), key=["D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _gelu_bwd_kernel(
    DY,  # (N, D)
    X,  # (N, D)
    Bias,  # (D,); unused without HAS_BIAS
    DX,  # (N, D), contiguous
    DBiasPartial,  # (G, D) float32 (float64 for float64), contiguous; unused without HAS_BIAS
    N,
    D,
    G,
    stride_dyn,
    stride_dyd,
    stride_xn,
    stride_xd,
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # program (c, g) owns columns c·BLOCK_C.. and every G-th row tile from g; it sums its dbias part
    ACC: tl.constexpr = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    pid_g = tl.program_id(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < D
    if HAS_BIAS:
        b = widen(tl.load(Bias + offs_c, mask=mask_c, other=0.0), ACC)
    db = tl.zeros((BLOCK_C,), dtype=ACC)
    for r0 in range(pid_g * BLOCK_R, N, G * BLOCK_R):
        offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (offs_r[:, None] < N) & mask_c[None, :]
        x = tl.load(X + offs_r[:, None] * stride_xn + offs_c[None, :] * stride_xd, mask=mask, other=0.0)
        x = widen(x, ACC)
        dy = tl.load(DY + offs_r[:, None] * stride_dyn + offs_c[None, :] * stride_dyd, mask=mask, other=0.0)
        if HAS_BIAS:
            x += b[None, :]
        dx = widen(dy, ACC) * _gelu_grad(x, APPROX_TANH)  # 0 where masked: dy = 0 there
        dx_ptrs = DX + offs_r[:, None] * D + offs_c[None, :]
        tl.store(dx_ptrs, round_to(dx, DX.dtype.element_ty, INTERP_BF16), mask=mask)
        if HAS_BIAS:
            db += tl.sum(dx, 0)
    if HAS_BIAS:
        tl.store(DBiasPartial + pid_g * D + offs_c, db, mask=mask_c)


# ---- launchers ----------------------------------------------------------------------------------

_FN = "fusedformer.kernels.gelu"


def _check(input: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> None:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{_FN}: expected approximate to be 'none' or 'tanh', got {approximate!r}")
    if input.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{_FN}: expected input of a floating dtype, got {input.dtype}")
    if bias is not None:
        D = input.shape[-1] if input.dim() else 1
        if tuple(bias.shape) != (D,):
            raise ValueError(f"{_FN}: expected bias of shape ({D},), got {tuple(bias.shape)}")
        if bias.dtype != input.dtype or bias.device != input.device:
            raise TypeError(
                f"{_FN}: expected bias of input's dtype and device ({input.dtype}, {input.device}), "
                f"got {bias.dtype} on {bias.device}"
            )


def _as_rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """(*, D) -> (N, D), a view where the strides allow."""
    return t.reshape(-1, D)


def _block_c(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), 256 if INTERPRET else 1024)


def gelu_forward(
    input: torch.Tensor,  # (*, D)
    bias: torch.Tensor | None,  # (D,)
    approximate: str,  # "none" | "tanh"
) -> torch.Tensor:  # (*, D), fresh and contiguous
    """``gelu(input + bias)``; float16, bfloat16, float32 and float64."""
    _check(input, bias, approximate)
    D = input.shape[-1] if input.dim() else 1
    y = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if y.numel() == 0:
        return y
    x = _as_rows(input, D)  # (N, D)
    N = x.shape[0]
    BLOCK_C = _block_c(D)

    # rows on axis x (2^31 - 1 programs); column blocks on axis y, capped at 65,535 by CUDA, which D would
    # pass only beyond 65,535 x 1,024 = 67M columns: no folding needed (attention's B·H is another matter)
    def grid(META):
        return (triton.cdiv(N, META["BLOCK_R"]), triton.cdiv(D, BLOCK_C))

    torch.library.wrap_triton(_gelu_fwd_kernel)[grid](
        x, bias if bias is not None else x, y, N, D, x.stride(0), x.stride(1),
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", INTERP_BF16=interp_bf16(input.dtype),
        BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return y


def gelu_backward(
    grad_out: torch.Tensor,  # (*, D)
    input: torch.Tensor,  # (*, D)
    bias: torch.Tensor | None,  # (D,)
    approximate: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # grad_input (*, D); grad_bias (D,), or (0,) without a bias
    """Gradients of ``gelu(input + bias)``; ``grad_bias`` is reduced deterministically (no atomics)."""
    _check(input, bias, approximate)
    if grad_out.shape != input.shape:
        raise ValueError(
            f"{_FN}: expected grad_out of input's shape {tuple(input.shape)}, got {tuple(grad_out.shape)}"
        )
    D = input.shape[-1] if input.dim() else 1
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if dx.numel() == 0:
        return dx, torch.zeros_like(bias) if bias is not None else input.new_empty((0,))
    x, dy = _as_rows(input, D), _as_rows(grad_out, D)  # (N, D)
    N = x.shape[0]
    BLOCK_C = _block_c(D)
    G = num_partials(input.device, cap=triton.cdiv(N, 16))
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    partial = torch.empty((G, D), dtype=acc_dtype, device=input.device) if bias is not None else x

    def grid(META):
        return (triton.cdiv(D, BLOCK_C), G)

    torch.library.wrap_triton(_gelu_bwd_kernel)[grid](
        dy, x, bias if bias is not None else x, dx, partial, N, D, G,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", INTERP_BF16=interp_bf16(input.dtype),
        BLOCK_C=BLOCK_C,
    )  # fmt: skip
    dbias = sum_rows(partial, bias.dtype) if bias is not None else input.new_empty((0,))
    return dx, dbias
