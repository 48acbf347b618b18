"""The machine's own ceilings, measured at the start of a run: what 100 % means in the report.

- GEMM: a large square ``torch.mm`` in the benchmark's dtype (2·n³ FLOP a call): the FLOP rate that
  attention, a chain of matrix products, can at best approach here.
- copy: ``dst.copy_(src)`` of a tensor far larger than the caches (2 · size bytes a call, one read and
  one write): the memory bandwidth that LayerNorm and GELU, which stream their input, are bound by.

Each is the best of a few calls after a warm-up (a ceiling is what the machine *can* do; the median
is reported beside it). A run measures them at its start and again at its end and keeps the better
of the two, so that a busy moment at the start does not set the bar low.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

__all__ = ["Ceilings", "best_of", "measure_ceilings"]


@dataclasses.dataclass
class Ceilings:
    gemm_gflops: float  # best
    gemm_gflops_median: float
    gemm_n: int
    copy_gbps: float  # best
    copy_gbps_median: float
    copy_mib: int
    dtype: str

    def describe(self) -> str:
        return (
            f"GEMM {self.gemm_gflops:.1f} GFLOP/s ({self.dtype} torch.mm n={self.gemm_n}, best; "
            f"median {self.gemm_gflops_median:.1f}), copy {self.copy_gbps:.1f} GB/s "
            f"({self.copy_mib} MiB tensor copy, read+write, best; median {self.copy_gbps_median:.1f})"
        )


def best_of(a: Ceilings, b: Ceilings) -> Ceilings:
    """The higher of two measurements of each ceiling (a busy moment only ever lowers one)."""
    gemm = a if a.gemm_gflops >= b.gemm_gflops else b
    copy = a if a.copy_gbps >= b.copy_gbps else b
    return dataclasses.replace(
        gemm, copy_gbps=copy.copy_gbps, copy_gbps_median=copy.copy_gbps_median, copy_mib=copy.copy_mib
    )


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


def measure_ceilings(
    device: torch.device, dtype: torch.dtype, quick: bool = False, gemm_n: int | None = None
) -> Ceilings:
    """GEMM GFLOP/s and copy GB/s on ``device``; ``quick`` uses fewer, smaller calls."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = gemm_n or (8192 if cuda else (1536 if quick else 2048))
    repeats = 3 if quick else 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    gemm = [2.0 * n**3 / t / 1e9 for t in _times(lambda: torch.mm(a, b, out=c), repeats, sync)]
    del a, b, c
    copy_mib = 1024 if cuda else 256
    src = torch.ones(copy_mib * 2**20 // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = 2.0 * src.numel() * src.element_size()
    copy = [nbytes / t / 1e9 for t in _times(lambda: dst.copy_(src), repeats * 2, sync)]
    del src, dst
    return Ceilings(
        gemm_gflops=max(gemm),
        gemm_gflops_median=statistics.median(gemm),
        gemm_n=n,
        copy_gbps=max(copy),
        copy_gbps_median=statistics.median(copy),
        copy_mib=copy_mib,
        dtype=str(dtype).replace("torch.", ""),
    )
