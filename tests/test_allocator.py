"""The CPU output allocator: huge-page blocks from 2 MiB, size classes, a capped LRU cache, its stats.

Every test starts from an empty cache with its own cap and counters (the ``fresh_cache`` fixture), so the
tests pass in any order and alone; ``cpu_memory_stats`` is read as differences where other outputs may live.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fusedformer as ff
from fusedformer import _C

MiB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_cache():
    before = _C.set_cache_limit(256 * MiB)
    ff.empty_cache()
    _C.reset_cache_counters()
    yield
    ff.empty_cache()
    _C.set_cache_limit(before)


def _output(mib: float) -> torch.Tensor:
    """A fused op's output of about ``mib`` MiB (float32, served by the block allocator from 2 MiB)."""
    return ff.gelu(torch.zeros(int(mib * MiB) // 4))


def test_large_outputs_are_reused_and_released():
    x = torch.randn(1024, 1024)  # 4 MiB: served by the block allocator
    y = ff.gelu(x)
    ptr = y.data_ptr()
    assert ptr % (2 * MiB) == 0, "large outputs are 2 MiB-aligned (huge-page candidates)"
    assert ff.cpu_memory_stats()["in_use_bytes"] >= 4 * MiB
    del y
    s = ff.cpu_memory_stats()
    assert s["cached_bytes"] == 4 * MiB and s["cached_blocks"] == 1 and s["misses"] == 1 and s["hits"] == 0
    y2 = ff.gelu(x)
    assert y2.data_ptr() == ptr, "a freed block of the same size class is reused"
    assert ff.cpu_memory_stats()["hits"] == 1
    torch.testing.assert_close(y2, torch.nn.functional.gelu(x))  # reuse returns correct results
    del y2
    assert ff.empty_cache() == 4 * MiB
    assert ff.cpu_memory_stats()["cached_bytes"] == 0


def test_size_classes_round_up_by_at_most_a_quarter():
    sizes = [2 * MiB, 2 * MiB + 1, 5 * MiB, 9 * MiB, 17 * MiB + 3, 100 * MiB, 1000 * MiB + 7]
    for n in sizes:
        c = _C.block_size_class(n)
        assert c >= n and c % (2 * MiB) == 0, (n, c)
        assert c <= max(2 * MiB, 1.25 * n + 2 * MiB), f"{n} rounds up to {c}: more than a quarter"
        pages = c // (2 * MiB)
        low = max(pages.bit_length() - 3, 0)
        assert pages >> low << low == pages, f"{n} -> {pages} pages: more than 3 significant bits"
    assert _C.block_size_class(9 * MiB) == _C.block_size_class(10 * MiB) == 10 * MiB


def test_nearby_shapes_share_a_block():
    y = _output(9.0)  # class 10 MiB
    ptr = y.data_ptr()
    del y
    y = _output(9.5)  # another shape, the same class
    assert y.data_ptr() == ptr
    s = ff.cpu_memory_stats()
    assert (s["hits"], s["misses"]) == (1, 1)


def test_cap_evicts_least_recently_freed():
    _C.set_cache_limit(8 * MiB)
    a, b, c = _output(4), _output(4), _output(2)
    pa, pb, pc = a.data_ptr(), b.data_ptr(), c.data_ptr()
    del a  # freed first: the oldest
    del b
    s = ff.cpu_memory_stats()
    assert s["cached_bytes"] == 8 * MiB and s["evictions"] == 0
    del c  # 10 MiB would exceed the 8 MiB cap: a (the least recently freed) goes
    s = ff.cpu_memory_stats()
    assert s["cached_bytes"] == 6 * MiB and s["cached_blocks"] == 2 and s["evictions"] == 1
    assert s["cached_bytes"] <= s["limit_bytes"] == 8 * MiB
    # b and c are still cached and served again; a was returned to the system
    got = {_output(4).data_ptr(), _output(2).data_ptr()}
    assert got == {pb, pc}
    assert ff.cpu_memory_stats()["hits"] == 2


def test_a_block_larger_than_the_cap_is_not_cached():
    _C.set_cache_limit(4 * MiB)
    y = _output(6)
    del y
    s = ff.cpu_memory_stats()
    assert s["cached_bytes"] == 0 and s["in_use_bytes"] == 0


def test_lowering_the_cap_evicts_at_once():
    ys = [_output(2) for _ in range(4)]
    del ys
    assert ff.cpu_memory_stats()["cached_bytes"] == 8 * MiB
    _C.set_cache_limit(3 * MiB)
    s = ff.cpu_memory_stats()
    assert s["cached_bytes"] == 2 * MiB and s["evictions"] == 3


def test_small_outputs_use_torch_allocator():
    y = ff.gelu(torch.randn(10, 10))
    assert y.untyped_storage().nbytes() == 400
    assert ff.cpu_memory_stats()["misses"] == 0


def _in_fresh_process(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_default_cap_is_256_mib_and_the_environment_sets_it():
    code = "import fusedformer as ff; print(ff.cpu_memory_stats()['limit_bytes'])"
    env = {k: v for k, v in os.environ.items() if k != "FUSEDFORMER_CPU_CACHE_MB"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 256 * MiB
    assert int(_in_fresh_process(code, FUSEDFORMER_CPU_CACHE_MB="64")) == 64 * MiB


def test_cache_can_be_turned_off():
    code = (
        "import torch, fusedformer as ff\n"
        "y = ff.gelu(torch.randn(1024, 1024)); del y\n"
        "print(ff.cpu_memory_stats()['cached_bytes'])\n"
    )
    assert _in_fresh_process(code, FUSEDFORMER_CPU_CACHE_MB="0") == "0"
