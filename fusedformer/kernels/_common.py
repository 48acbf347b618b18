"""What the Triton kernels share: interpreter detection, the bf16 helpers, dots, grids, a column-sum kernel.

The kernels are GPU code; the tests run the same source under Triton's interpreter
(``TRITON_INTERPRET=1``, read when the kernel modules are imported: ``@triton.jit`` decides then).

NOTE [2026-12-02] bf16 under the interpreter (Triton 3.9). The interpreter holds bf16 values as their
uint16 bit patterns: loads, stores, transposes and bitcasts of bf16 tiles are right, but arithmetic and
``tl.dot`` on them compute on the integers, its fp32 -> bf16 cast truncates (the GPU rounds to nearest
even), and both of its bf16 <-> fp32 casts get subnormals wrong. So the kernels keep bf16 tiles as bf16
(loaded, carried and stored as the GPU does) and never cast a bf16 value with ``.to``:

* :func:`widen` turns bf16 into fp32 through its bits, on the GPU too (there it is the shift the GPU's own
  conversion is), so both run the same code, exact for every value;
* :func:`round_to` rounds fp32 to bf16 by hand, to nearest even, where the GPU uses its ``cvt.rn``
  (checked bit for bit against torch's rounding by the tests);
* :func:`dot` widens bf16 operands (exactly) just before the product, where the GPU gives them to the
  tensor cores as they are.

Those two, switched by the ``INTERP_BF16`` constexpr (True only when the interpreter runs a bf16 call,
see :func:`interp_bf16`), are all that differs between the GPU's bf16 path and the one the tests run;
the products' summation order differs too, as it does for every dtype under the interpreter. fp16 needs
none of this (numpy has a real float16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "TUNE",
    "tune_configs",
    "MAX_GRID_X",
    "MAX_GRID_YZ",
    "interp_bf16",
    "dot_precision",
    "widen",
    "round_to",
    "dot",
    "div_rn",
    "rsqrt_rn",
    "sum_rows",
    "num_partials",
    "flat_grid",
    "length_bucket",
    "max_shared_memory",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# How widely the autotuners search on a GPU, read once at import (as TRITON_INTERPRET): "full" (the
# default), "quick" (a few configs per kernel: make gpu-check's timings, within its time budget) or
# "off" (one config per kernel: make gpu-check's correctness tests, which need no speed).
TUNE = os.environ.get("FUSEDFORMER_TRITON_TUNE", "full").strip().lower() or "full"
if TUNE not in ("full", "quick", "off"):
    raise ValueError(f"FUSEDFORMER_TRITON_TUNE must be full, quick or off; got {TUNE!r}")
# CUDA's grid limits: x up to 2^31 - 1 programs, y and z up to 65,535 each.
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65_535


def tune_configs(full: list, quick: list) -> list:
    """The configs an autotuner searches under ``TUNE``: all of ``full``, ``quick``, or ``quick[0]``."""
    if TUNE == "full":
        return full
    return quick if TUNE == "quick" else quick[:1]


def interp_bf16(dtype: torch.dtype) -> bool:
    """The ``INTERP_BF16`` constexpr: True only under the interpreter, for bf16."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of float32 dots: ``"tf32"`` where torch allows TF32 for float32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, off by default), else ``"ieee"`` (full float32, as torch
    computes float32 attention). Irrelevant to half dtypes, whose dots are exact products summed in fp32.

    Under the interpreter the choice reaches ``tl.dot``, which ignores it (numpy sums full float32
    products): the tests cannot show TF32's rounding, only that the flag is followed.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def num_partials(device: torch.device, cap: int) -> int:
    """How many programs share a reduction (each writes one row of partial sums), at most ``cap``."""
    if device.type == "cuda":
        return min(cap, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(cap, 4)


def flat_grid(n_blocks: int, n_heads: int, what: str) -> tuple[int]:
    """A 1-D grid of ``n_blocks * n_heads`` programs, program ``pid`` = (head ``pid // n_blocks``, block
    ``pid % n_blocks``).

    Not (n_blocks, n_heads): CUDA caps grid dims y and z at 65,535, which B·H passes (B = 1024, H = 64).
    Axis x takes 2^31 - 1 programs and keeps the launch order of a (blocks, heads) grid (the blocks of one
    head run together and share its K/V in L2). Past that, an error that names the sizes.
    """
    n = n_blocks * n_heads
    if n > MAX_GRID_X:
        raise ValueError(
            f"{what}: {n_blocks} blocks x {n_heads} batch*heads = {n} programs, more than a CUDA grid holds "
            f"({MAX_GRID_X}); split the batch"
        )
    return (max(n, 1),)


def length_bucket(n: int) -> int:
    """The autotuning key of a sequence length: the next power of two, at least 16.

    Keying on the exact length would re-tune every config at each new length (each decode step, each
    dynamically padded batch); within a bucket the best tiles hardly change, so a length re-tunes only
    when it enters a new bucket (about log2 of the longest length buckets in all).
    """
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def max_shared_memory(device: torch.device) -> int | None:
    """The shared memory one program may use on ``device`` (bytes, the opt-in maximum), or None where
    there is no such limit to respect (CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return None
    from triton.runtime import driver

    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


@triton.jit
def widen(
    x,  # tile of any float dtype
    DTYPE: tl.constexpr = tl.float32,
):
    """``x`` in ``DTYPE`` (float32, or float64 for float64 math). bf16 goes through its bits, exactly: the
    bits moved to the top half of a float32 (what the GPU's own conversion does; the interpreter's cast
    is wrong for subnormals)."""
    if x.dtype == tl.bfloat16:
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        y = y.to(DTYPE)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def round_to(
    x,  # fp32 tile
    DTYPE: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    """``x`` rounded to nearest even in ``DTYPE``, ready for a ``tl.dot`` operand or a store.

    With ``INTERP_BF16`` (the interpreter, bf16) the rounding is done by hand on the bits, because the
    interpreter's cast truncates; the result is a true bf16 tile either way. NaN stays NaN.
    """
    if INTERP_BF16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # a NaN with a low payload would round to inf
        y = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def dot(
    a,  # (M, K) tile
    b,  # (K, N) tile
    acc,  # (M, N) float32 accumulator, or None
    PRECISION: tl.constexpr,  # "ieee" or "tf32" (float32 operands only; see dot_precision)
    INTERP_BF16: tl.constexpr,
):
    """``acc + a·b`` in float32. Under the interpreter bf16 operands are widened exactly first (its
    ``tl.dot`` would multiply their bit patterns); on the GPU they go to the tensor cores as they are."""
    if INTERP_BF16:
        a = widen(a)
        b = widen(b)
    return tl.dot(a, b, acc, input_precision=PRECISION)


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
    INTERP_BF16: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # one program per BLOCK_C columns: sum the G rows of partial sums in a fixed order (deterministic);
    # each output column has one owner program and the partials are only read: race-free
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), dtype=Partial.dtype.element_ty)
    for g in range(0, G, BLOCK_G):
        offs_g = g + tl.arange(0, BLOCK_G)
        mask = (offs_g[:, None] < G) & (offs_c[None, :] < D)
        acc += tl.sum(tl.load(Partial + offs_g[:, None] * D + offs_c[None, :], mask=mask, other=0.0), 0)
    tl.store(Out + offs_c, round_to(acc, Out.dtype.element_ty, INTERP_BF16), mask=offs_c < D)


def sum_rows(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(G, D) partial sums -> (D,) in ``dtype``: the second step of a deterministic column reduction."""
    G, D = partial.shape
    out = torch.empty((D,), dtype=dtype, device=partial.device)
    if D == 0:
        return out
    BLOCK_C = 128 if INTERPRET else 256
    grid = (triton.cdiv(D, BLOCK_C),)
    torch.library.wrap_triton(_sum_rows_kernel)[grid](
        partial, out, G, D, INTERP_BF16=interp_bf16(dtype), BLOCK_G=8, BLOCK_C=BLOCK_C
    )
    return out
