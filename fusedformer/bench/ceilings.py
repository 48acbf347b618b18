"""The machine's own ceilings, measured at the start of a run: what 100 % means in the report.

- GEMM, one per dtype the run measures (float32, bfloat16, ...): a large square ``torch.mm`` in that
  dtype (2·n³ FLOP a call), the FLOP rate that attention, a chain of matrix products, can at best
  approach here in that dtype. They differ by large factors on one machine (a CPU with AMX-BF16 runs
  bfloat16 products several times faster than float32 ones), so each row is held to its own dtype's.
- copy: ``dst.copy_(src)`` of a float32 tensor far larger than the caches (2 · size bytes a call, one
  read and one write): the memory bandwidth that LayerNorm and GELU, which stream their input, are
  bound by, whatever their dtype.

Each is the best of a few calls after a warm-up (a ceiling is what the machine *can* do; the median
is reported beside it). A run measures them at its start and again at its end and keeps the better
of the two, so that a busy moment at the start does not set the bar low.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

import torch

__all__ = ["Ceilings", "GemmCeiling", "best_of", "measure_ceilings"]


@dataclasses.dataclass
class GemmCeiling:
    """``torch.mm`` of two (n, n) matrices in ``dtype``, 2·n³ FLOP a call."""

    dtype: str  # "float32", "bfloat16", ...
    gflops: float  # best
    gflops_median: float
    n: int

    def describe(self) -> str:
        return (
            f"GEMM {self.dtype} {self.gflops:.1f} GFLOP/s (torch.mm n={self.n}, best; "
            f"median {self.gflops_median:.1f})"
        )


@dataclasses.dataclass
class Ceilings:
    gemm: dict[str, GemmCeiling]  # dtype name -> its GEMM ceiling, in the order measured
    copy_gbps: float  # best
    copy_gbps_median: float
    copy_mib: int

    def gemm_gflops(self, dtype: str) -> float:
        """The GEMM ceiling of ``dtype`` in GFLOP/s; NaN when the run did not measure that dtype."""
        ceiling = self.gemm.get(dtype)
        return ceiling.gflops if ceiling is not None else float("nan")

    def describe(self) -> list[str]:
        """One line per ceiling: each dtype's GEMM, then the copy."""
        return [
            *(g.describe() for g in self.gemm.values()),
            f"copy {self.copy_gbps:.1f} GB/s ({self.copy_mib} MiB tensor copy, read+write, best; "
            f"median {self.copy_gbps_median:.1f})",
        ]


def best_of(a: Ceilings, b: Ceilings) -> Ceilings:
    """The higher of two measurements of each ceiling (a busy moment only ever lowers one)."""
    gemm = dict(a.gemm)
    for dtype, g in b.gemm.items():
        if dtype not in gemm or g.gflops > gemm[dtype].gflops:
            gemm[dtype] = g
    copy = a if a.copy_gbps >= b.copy_gbps else b
    return Ceilings(gemm, copy.copy_gbps, copy.copy_gbps_median, copy.copy_mib)


def _times(fn, repeats: int, sync) -> list[float]:
    fn()  # warm-up
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


# The longest one GEMM call of the ceiling may take (estimated): a CPU without hardware for a dtype (bf16
# on an AVX2-only CPU: torch.mm at ~0.35 GFLOP/s) would otherwise spend ~50 s per n=2048 call, minutes
# per measurement. Its rate at a smaller n is as telling: that path is slow at any size.
_MAX_CALL_S = 1.0
_PROBE_N = 256


def _affordable_n(n: int, dtype: torch.dtype, device: torch.device, sync) -> int:
    """n, halved (not below _PROBE_N) while one n x n x n torch.mm is estimated to take over _MAX_CALL_S,
    from the time of a _PROBE_N one."""
    if n <= _PROBE_N:
        return n
    a = torch.randn(_PROBE_N, _PROBE_N, device=device, dtype=dtype)
    probe = min(_times(lambda: torch.mm(a, a), 2, sync))
    while n > _PROBE_N and probe * (n / _PROBE_N) ** 3 > _MAX_CALL_S:
        n //= 2
    return max(n, _PROBE_N)


def measure_ceilings(
    device: torch.device, dtypes: Sequence[str], quick: bool = False, gemm_n: int | None = None
) -> Ceilings:
    """A GEMM GFLOP/s per dtype in ``dtypes`` (names: "float32", ...) and the copy GB/s, on ``device``.

    ``quick`` uses fewer, smaller calls.
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = gemm_n or (8192 if cuda else (1536 if quick else 2048))
    repeats = 3 if quick else 5
    gemm: dict[str, GemmCeiling] = {}
    for name in dict.fromkeys(dtypes):
        dtype = getattr(torch, name)
        size = _affordable_n(n, dtype, device, sync)
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        c = torch.empty(size, size, device=device, dtype=dtype)
        rates = [2.0 * size**3 / t / 1e9 for t in _times(lambda: torch.mm(a, b, out=c), repeats, sync)]
        del a, b, c
        gemm[name] = GemmCeiling(name, max(rates), statistics.median(rates), size)
    copy_mib = 1024 if cuda else 256
    src = torch.ones(copy_mib * 2**20 // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = 2.0 * src.numel() * src.element_size()
    copy = [nbytes / t / 1e9 for t in _times(lambda: dst.copy_(src), repeats * 2, sync)]
    del src, dst
    return Ceilings(
        gemm=gemm,
        copy_gbps=max(copy),
        copy_gbps_median=statistics.median(copy),
        copy_mib=copy_mib,
    )
