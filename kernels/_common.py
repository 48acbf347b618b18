"""What the Triton kernels share: interpreter detection, the bf16 work-around, a column-sum kernel.

The kernels are GPU code; the tests run the same source under Triton's interpreter
(``TRITON_INTERPRET=1``, read when the kernel modules are imported: ``@triton.jit`` decides then).

NOTE [2026-11-23] the bf16 trap. The interpreter (Triton 3.x) holds bf16 tensors as their uint16 bit
patterns, so arithmetic and ``tl.dot`` on bf16 values silently compute on integers, and its fp32 -> bf16
cast truncates where the GPU rounds to nearest even. Each kernel therefore takes an ``UPCAST``
constexpr, on only when interpreting bf16 (see :func:`upcast`): loads widen bf16 to fp32 at once
(``if UPCAST: x = x.to(tl.float32)``), and :func:`round_to` rounds to bf16 by hand. On a GPU the flag
is off and the kernels keep bf16 operands for the tensor cores. fp16 needs none of this (numpy has a
real float16), so fp16 under the interpreter runs the very code path a GPU runs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "upcast", "round_to", "div_rn", "rsqrt_rn", "sum_rows", "num_partials"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def upcast(dtype: torch.dtype) -> bool:
    """The ``UPCAST`` constexpr: True only under the interpreter, for bf16."""
    return INTERPRET and dtype == torch.bfloat16


def num_partials(device: torch.device, cap: int) -> int:
    """How many programs share a reduction (each writes one row of partial sums), at most ``cap``."""
    if device.type == "cuda":
        return min(cap, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(cap, 4)


@triton.jit
def round_to(
    x,  # fp32 tile
    DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``x`` rounded to nearest even in ``DTYPE``, ready for a ``tl.dot`` operand or a store.

    With ``UPCAST`` (interpreting bf16) the result stays fp32 but holds the bf16 value: the low 16 bits
    are rounded away by hand, because the interpreter's own cast truncates.
    """
    if UPCAST:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        y = bits.to(tl.float32, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def div_rn(x, y):
    """``x / y`` rounded to nearest: the plain ``/`` on float32 is a 2-ulp approximation on NVIDIA GPUs."""
    if y.dtype == tl.float32:
        z = tl.math.div_rn(x, y)
    else:
        z = x / y
    return z


@triton.jit
def rsqrt_rn(x):
    """``1 / sqrt(x)``, each step rounded to nearest (``tl.sqrt`` on float32 is approximate)."""
    if x.dtype == tl.float32:
        r = tl.math.div_rn(1.0, tl.math.sqrt_rn(x))
    else:
        r = 1.0 / tl.sqrt(x)
    return r


@triton.jit
def _sum_rows_kernel(
    Partial,  # (G, D) float32 (float64 for float64 outputs), contiguous
    Out,  # (D,)
    G,
    D,
    UPCAST: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # one program per BLOCK_C columns: sum the G rows of partial sums in a fixed order (deterministic)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), dtype=Partial.dtype.element_ty)
    for g in range(0, G, BLOCK_G):
        offs_g = g + tl.arange(0, BLOCK_G)
        mask = (offs_g[:, None] < G) & (offs_c[None, :] < D)
        acc += tl.sum(tl.load(Partial + offs_g[:, None] * D + offs_c[None, :], mask=mask, other=0.0), 0)
    tl.store(Out + offs_c, round_to(acc, Out.dtype.element_ty, UPCAST), mask=offs_c < D)


def sum_rows(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(G, D) partial sums -> (D,) in ``dtype``: the second step of a deterministic column reduction."""
    G, D = partial.shape
    out = torch.empty((D,), dtype=dtype, device=partial.device)
    if D == 0:
        return out
    BLOCK_C = 128 if INTERPRET else 256
    grid = (triton.cdiv(D, BLOCK_C),)
    torch.library.wrap_triton(_sum_rows_kernel)[grid](
        partial, out, G, D, UPCAST=upcast(dtype), BLOCK_G=8, BLOCK_C=BLOCK_C
    )
    return out
