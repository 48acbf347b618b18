"""The CPU output allocator's cache (csrc/cpu/allocator.h): what it holds, and emptying it.

Outputs of the fused CPU ops from 2 MiB up are 2 MiB-aligned huge-page blocks. A freed block is kept for
the next output of its size class (a multiple of 2 MiB with at most 3 significant bits: at most 25% more
than asked), up to ``FUSEDFORMER_CPU_CACHE_MB`` (default 256; 0 turns the cache off) per process; past
that the least recently freed blocks go back to the system. Smaller outputs come from torch's allocator
and are not counted here.
"""

from __future__ import annotations

from fusedformer import backends

__all__ = ["cpu_memory_stats", "empty_cache"]


def _extension():
    if backends._C is None:
        raise RuntimeError(f"fusedformer: the CPU allocator is part of fusedformer._C: {backends._C_ERROR}")
    return backends._C


def cpu_memory_stats() -> dict[str, int]:
    """The CPU output cache now: ``cached_bytes`` / ``cached_blocks`` (free, kept for reuse),
    ``in_use_bytes`` / ``in_use_blocks`` (outputs alive, by size class), ``limit_bytes`` (the cap on
    ``cached_bytes``), and since the process started: ``hits`` (outputs served from the cache), ``misses``
    (new blocks), ``evictions`` (blocks freed to stay under the cap)."""
    return dict(_extension().cache_stats())


def empty_cache() -> int:
    """Returns every cached (free) CPU output block to the system; returns the bytes released.
    Outputs still alive are untouched. The CPU counterpart of ``torch.cuda.empty_cache()``."""
    return int(_extension().empty_cache())
