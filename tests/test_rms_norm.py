"""fusedformer.rms_norm and the fusedformer::rms_norm_fwd/bwd ops against the float64 reference and F.rms_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer import reference
from tests.conftest import DTYPES, HALF_DTYPES, assert_error_within, assert_rounded_from, leaf_copies, randn

SHAPES = [  # (input shape, normalized_shape)
    ((1, 1), (1,)),
    ((17, 97), (97,)),
    ((3, 5, 1025), (1025,)),
    ((2, 4, 17, 3), (17, 3)),
    ((256,), (256,)),
]


def _run(fn, x, w, ns, grad, eps=None):
    out = fn(x, ns, w, eps)
    out.backward(grad)
    return out, x.grad, w.grad if w is not None else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ns", SHAPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_reference(dtype, shape, ns, weighted):
    x = randn(*shape, dtype=torch.float64, scale=2.0, offset=1.0)
    w = randn(*ns, dtype=torch.float64) if weighted else None
    grad = randn(*shape, dtype=torch.float64)

    def copies(dt):
        xs, *ps = leaf_copies(x, *([w] if weighted else []), dtype=dt)
        return xs, (ps[0] if weighted else None)

    eps = torch.finfo(dtype).eps  # what eps=None means in `dtype`, given explicitly to the float64 truth
    truth = _run(reference.rms_norm, *copies(torch.float64), ns, grad, eps)
    ours = _run(ff.rms_norm, *copies(dtype), ns, grad.to(dtype))
    torchs = _run(F.rms_norm, *copies(dtype), ns, grad.to(dtype))
    for name, o, t, r, factor in zip(("out", "dx", "dweight"), ours, torchs, truth, (2, 3, 3)):
        if r is not None:
            assert o.dtype == dtype
            assert_error_within(name, o, t, r, factor)


@pytest.mark.parametrize("shape,ns", SHAPES)
def test_rms_norm_float64_matches_torch(shape, ns):
    """float64: the same result as F.rms_norm to float64 rounding, output and every gradient."""
    x, w, grad = randn(*shape, dtype=torch.float64), randn(*ns, dtype=torch.float64), randn(*shape, dtype=torch.float64)
    ours = _run(ff.rms_norm, *leaf_copies(x, w), ns, grad, 1e-6)
    torchs = _run(F.rms_norm, *leaf_copies(x, w), ns, grad, 1e-6)
    for name, o, t in zip(("out", "dx", "dweight"), ours, torchs):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_every_capability(each_cpu_capability, dtype):
    x, w, grad = randn(33, 700, dtype=dtype), randn(700, dtype=dtype), randn(33, 700, dtype=dtype)
    eps = torch.finfo(dtype).eps
    truth = _run(reference.rms_norm, *leaf_copies(x, w, dtype=torch.float64), (700,), grad.double(), eps)
    ours = _run(ff.rms_norm, *leaf_copies(x, w), (700,), grad)
    torchs = _run(F.rms_norm, *leaf_copies(x, w), (700,), grad)
    for name, o, t, r, factor in zip(("out", "dx", "dweight"), ours, torchs, truth, (2, 3, 3)):
        assert o.dtype == dtype
        assert_error_within(f"{name} [{each_cpu_capability}]", o, t, r, factor)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 97, 1025])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_half_is_the_float32_kernel_rounded_once(each_cpu_capability, dtype, cols, weighted):
    x, dy = randn(7, cols, dtype=dtype, scale=2.0), randn(7, cols, dtype=dtype)
    w = randn(cols, dtype=dtype) if weighted else None
    wide = [t.float() if t is not None else None for t in (x, w, dy)]
    fwd, bwd = torch.ops.fusedformer.rms_norm_fwd, torch.ops.fusedformer.rms_norm_bwd
    y, rstd = fwd(x, [cols], w, 1e-5)
    y32, rstd32 = fwd(wide[0], [cols], wide[1], 1e-5)
    assert rstd.dtype == torch.float32 and torch.equal(rstd, rstd32)
    assert_rounded_from("out", y, y32)
    dx, dw = bwd(dy, x, [cols], rstd, w)
    dx32, dw32 = bwd(wide[2], wide[0], [cols], rstd32, wide[1])
    assert_rounded_from("dx", dx, dx32)
    if w is None:
        assert dw.numel() == 0
    else:
        assert_rounded_from("dweight", dw, dw32)


def test_rms_norm_eps_default_is_finfo_eps():
    x = randn(4, 16, scale=1e-3)  # small enough that eps matters
    torch.testing.assert_close(ff.rms_norm(x, (16,)), F.rms_norm(x, (16,)))
    torch.testing.assert_close(ff.rms_norm(x, (16,), eps=0.5), F.rms_norm(x, (16,), eps=0.5))
    assert not torch.allclose(ff.rms_norm(x, (16,)), ff.rms_norm(x, (16,), eps=0.5))


def test_rms_norm_non_contiguous_input():
    x, grad = randn(64, 40).t(), randn(64, 40).t()
    w = randn(64)
    ours = _run(ff.rms_norm, *leaf_copies(x, w), (64,), grad)
    dense = _run(ff.rms_norm, *leaf_copies(x.contiguous(), w), (64,), grad.contiguous())
    for name, o, d in zip(("out", "dx", "dweight"), ours, dense):
        assert torch.equal(o, d), name


def test_rms_norm_gradcheck():
    x = randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    w = randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: ff.rms_norm(x, (4, 7), w), (x, w))
    assert torch.autograd.gradcheck(lambda x: ff.rms_norm(x, (7,), eps=1e-3), (x,))


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_opcheck(weighted):
    x = randn(5, 3, 24, requires_grad=True)
    w = randn(24, requires_grad=True) if weighted else None
    torch.library.opcheck(torch.ops.fusedformer.rms_norm_fwd.default, (x, [24], w, 1e-5))
    w = w.detach() if w is not None else None
    _, rstd = torch.ops.fusedformer.rms_norm_fwd(x.detach(), [24], w, 1e-5)
    torch.library.opcheck(torch.ops.fusedformer.rms_norm_bwd.default, (randn(5, 3, 24), x.detach(), [24], rstd, w))


def test_rms_norm_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w: ff.rms_norm(x, (48,), w).square().sum(), fullgraph=True)
    x, w = leaf_copies(randn(6, 48), randn(48))
    fn(x, w).backward()
    x2, w2 = leaf_copies(x, w)
    F.rms_norm(x2, (48,), w2).square().sum().backward()
    for a, e in ((x.grad, x2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(a, e)


def test_rms_norm_served_by_fused_kernel():
    x = randn(8, 32)
    assert ff.explain(ff.rms_norm, x, (32,)).backend == "cpp"
    assert ff.explain("rms_norm", x, (32,)).backend == "cpp"


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((randn(4, 8), (7,)), {}, ValueError, "normalized_shape"),
        ((randn(4, 8), (8,)), {"weight": randn(7)}, ValueError, "weight"),
        ((randn(4, 8), (8,)), {"weight": randn(8, dtype=torch.float64)}, TypeError, "weight"),
        ((torch.ones(4, 8, dtype=torch.int64), (8,)), {}, TypeError, "floating-point"),
        ((randn(4, 8), (8,)), {"eps": -1.0}, ValueError, "eps"),
    ],
)
def test_rms_norm_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ff.rms_norm(*args, **kwargs)


def test_rms_norm_op_checks_its_inputs():
    with pytest.raises(RuntimeError, match="normalized_shape"):
        torch.ops.fusedformer.rms_norm_fwd(randn(4, 8), [9], None, 1e-5)
    with pytest.raises(RuntimeError, match="rstd"):
        torch.ops.fusedformer.rms_norm_bwd(randn(4, 8), randn(4, 8), [8], randn(3), None)
