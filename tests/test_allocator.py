"""The CPU output allocator: huge-page blocks from 2 MiB, reused after free, released on demand."""

from __future__ import annotations

import subprocess
import sys

import torch

import fusedformer as ff
from fusedformer import _C


def test_large_outputs_are_reused_and_released():
    x = torch.randn(1024, 1024)  # 4 MiB: served by the block allocator
    y = ff.gelu(x)
    ptr = y.data_ptr()
    assert ptr % (2 << 20) == 0, "large outputs are 2 MiB-aligned (huge-page candidates)"
    del y
    assert _C.cached_bytes() >= 4 << 20
    y2 = ff.gelu(x)
    assert y2.data_ptr() == ptr, "a freed block of the same size is reused"
    torch.testing.assert_close(y2, torch.nn.functional.gelu(x))  # reuse returns correct results
    del y2
    assert _C.empty_cache() >= 4 << 20
    assert _C.cached_bytes() == 0


def test_small_outputs_use_torch_allocator():
    y = ff.gelu(torch.randn(10, 10))
    assert y.untyped_storage().nbytes() == 400


def test_cache_can_be_turned_off():
    code = (
        "import torch, fusedformer as ff\n"
        "from fusedformer import _C\n"
        "y = ff.gelu(torch.randn(1024, 1024)); del y\n"
        "print(_C.cached_bytes())\n"
    )
    env = {**__import__("os").environ, "FUSEDFORMER_CPU_CACHE_MB": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
