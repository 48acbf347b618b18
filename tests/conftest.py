"""Shared test helpers: the tolerance rule, fresh random data, CPU-capability switching."""

from __future__ import annotations

import os

# Before anything imports fusedformer (and with it the Triton kernels, whose @triton.jit reads this):
# tests/test_triton.py runs the GPU kernels on CPU tensors under Triton's interpreter. The cpp backend
# still serves CPU tensors first, so the other tests are unaffected.
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Per-dtype floor, in units of the largest true value (at least 1: the inputs are unit normal, and a small
# result of cancelling O(1) terms carries their rounding): what the rule allows when PyTorch's own error is
# ~0. One unit in the last place (the dtype's epsilon) for float32 and the half types, so it never swamps
# the 2x/3x bound (PyTorch's error against the float64 truth is itself about an ulp or more). In float64
# the truth is computed in float64 too, so PyTorch's error is often exactly 0 and the floor *is* the bound:
# 64 ulps, a sum of a few thousand terms rounded differently.
ERROR_FLOOR = {
    torch.float64: 64 * torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF_DTYPES = [torch.bfloat16, torch.float16]


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth.double()).abs().max().item() if x.numel() else 0.0


def assert_error_within(
    name: str, ours: torch.Tensor, torchs: torch.Tensor, truth: torch.Tensor, factor: float
) -> None:
    """Our error against the float64 truth may be at most ``factor`` x PyTorch's error in our dtype."""
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err, err_torch = max_err(ours, truth), max_err(torchs, truth)
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    bound = factor * err_torch + ERROR_FLOOR[ours.dtype] * scale
    assert err <= bound, f"{name}: error {err:.3e} > {factor}x torch's {err_torch:.3e} (+ floor) = {bound:.3e}"


def assert_rounded_from(name: str, ours: torch.Tensor, wide: torch.Tensor) -> None:
    """``ours`` (bf16/fp16) is ``wide`` (float32) rounded once to ``ours.dtype``: bit for bit, NaN for NaN.

    One allowance: the AVX512-BF16 conversion (vcvtneps2bf16) flushes float32 denormals (|v| < 2^-126)
    to zero where torch's rounding keeps them.
    """
    assert ours.dtype in (torch.bfloat16, torch.float16) and wide.dtype == torch.float32
    expected = wide.to(ours.dtype)
    if ours.dtype == torch.bfloat16:
        denormal = wide.abs() < torch.finfo(torch.float32).tiny
        ours, expected = ours.masked_fill(denormal, 0), expected.masked_fill(denormal, 0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


def randn(*shape, dtype=torch.float32, scale=1.0, offset=0.0, requires_grad=False) -> torch.Tensor:
    """Fresh standard-normal data made in float64 and rounded once to ``dtype``."""
    t = (torch.randn(*shape, dtype=torch.float64) * scale + offset).to(dtype)
    return t.requires_grad_(requires_grad)


def leaf_copies(*tensors, dtype=None):
    """Detached leaf copies (optionally cast) that require grad."""
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def check_compiled_dropout(fn, inputs) -> list[torch.Tensor]:
    """``torch.compile(fn, fullgraph=True)``, ``fn(*inputs)`` a scalar with attention dropout inside: the
    compiled gradients are reproducible under torch.manual_seed, differ under another seed, are finite and
    nonzero, and equal eager's when Inductor draws random numbers as eager does (``fallback_random``).
    Returns the compiled gradients under manual_seed(7)."""

    def grads(f, manual_seed):
        leaves = leaf_copies(*inputs)
        torch.manual_seed(manual_seed)
        f(*leaves).backward()
        return [t.grad for t in leaves]

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    first, again, other = grads(compiled, 7), grads(compiled, 7), grads(compiled, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "manual_seed does not reproduce the run"
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in first), "no gradient flows"
    assert not torch.allclose(first[-1], other[-1]), "another seed, the same dropout"
    eager = grads(fn, 7)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        same_as_eager = grads(torch.compile(fn, fullgraph=True), 7)
    for a, b in zip(eager, same_as_eager):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    return first


@contextlib.contextmanager
def cpu_capability(name: str):
    from fusedformer import _C

    before = _C.cpu_capability()
    _C.set_cpu_capability(name)
    assert _C.cpu_capability() == name
    try:
        yield
    finally:
        _C.set_cpu_capability(before)


def _supported_capabilities() -> list[str]:
    """The CPU builds this CPU runs; none where fusedformer._C is missing (a GPU machine's torch that _C was
    not built for: the CPU tests then fail or skip on their own, and the ``gpu`` tests still collect)."""
    from fusedformer import backends

    _C = backends._C
    if _C is None:
        return []
    order = ["default", "avx2", "avx512", "avx512bf16"]
    return order[: order.index(_C.best_cpu_capability()) + 1]


CAPABILITIES = _supported_capabilities()


@pytest.fixture(params=CAPABILITIES)
def each_cpu_capability(request):
    """Runs the test once per CPU-capability build of the kernels that this CPU can execute."""
    with cpu_capability(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (fresh data), reproducible from the test's id (crc32: Python's hash()
    # of a str changes from process to process); FUSEDFORMER_TEST_SEED=N draws another sample.
    salt = int(os.environ.get("FUSEDFORMER_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ salt)
    yield
