"""fusedformer.layer_norm and the fusedformer::layer_norm_fwd/bwd ops against the float64 reference."""

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


def _run(fn, x, w, b, ns, grad):
    out = fn(x, ns, w, b, 1e-5)
    out.backward(grad)
    return out, x.grad, w.grad if w is not None else None, b.grad if b is not None else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ns", SHAPES)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm_matches_reference(dtype, shape, ns, affine):
    x = randn(*shape, dtype=torch.float64, scale=2.0, offset=3.0)  # a mean far from 0 on purpose
    w = randn(*ns, dtype=torch.float64) if affine != "none" else None
    b = randn(*ns, dtype=torch.float64) if affine == "weight+bias" else None
    grad = randn(*shape, dtype=torch.float64)
    params = [t for t in (w, b) if t is not None]

    def copies(dt):
        xs, *ps = leaf_copies(x, *params, dtype=dt)
        return xs, (ps[0] if w is not None else None), (ps[1] if b is not None else None)

    truth = _run(reference.layer_norm, *copies(torch.float64), ns, grad)
    ours = _run(ff.layer_norm, *copies(dtype), ns, grad.to(dtype))
    torchs = _run(F.layer_norm, *copies(dtype), ns, grad.to(dtype))
    for name, o, t, r, factor in zip(("out", "dx", "dweight", "dbias"), ours, torchs, truth, (2, 3, 3, 3)):
        if r is not None:
            assert o.dtype == dtype
            assert_error_within(name, o, t, r, factor)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_every_capability(each_cpu_capability, dtype):
    x, w, b = randn(33, 700, dtype=dtype), randn(700, dtype=dtype), randn(700, dtype=dtype)
    grad = randn(33, 700, dtype=dtype)
    truth = _run(reference.layer_norm, *leaf_copies(x, w, b, dtype=torch.float64), (700,), grad.double())
    ours = _run(ff.layer_norm, *leaf_copies(x, w, b), (700,), grad)
    torchs = _run(F.layer_norm, *leaf_copies(x, w, b), (700,), grad)
    for name, o, t, r, factor in zip(("out", "dx", "dweight", "dbias"), ours, torchs, truth, (2, 3, 3, 3)):
        assert o.dtype == dtype
        assert_error_within(f"{name} [{each_cpu_capability}]", o, t, r, factor)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 40, 97, 1025])  # a tail only, none, 1 lane, 8 lanes, ...
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
def test_layer_norm_half_is_the_float32_kernel_rounded_once(each_cpu_capability, dtype, cols, affine):
    """bf16/fp16 tensors are read and written in their dtype, and in between the kernel is the float32
    one: the same bits as the float32 op on the widened tensors, with the results rounded once."""
    x, dy = randn(7, cols, dtype=dtype, scale=2.0, offset=3.0), randn(7, cols, dtype=dtype)
    w = randn(cols, dtype=dtype) if "weight" in affine else None
    b = randn(cols, dtype=dtype) if "bias" in affine else None
    wide = [t.float() if t is not None else None for t in (x, w, b, dy)]
    fwd, bwd = torch.ops.fusedformer.layer_norm_fwd, torch.ops.fusedformer.layer_norm_bwd
    y, mean, rstd = fwd(x, [cols], w, b, 1e-5)
    y32, mean32, rstd32 = fwd(wide[0], [cols], wide[1], wide[2], 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32
    assert torch.equal(mean, mean32) and torch.equal(rstd, rstd32)
    assert_rounded_from("out", y, y32)
    dx, dw, db = bwd(dy, x, [cols], mean, rstd, w, b)
    dx32, dw32, db32 = bwd(wide[3], wide[0], [cols], mean32, rstd32, wide[1], wide[2])
    assert_rounded_from("dx", dx, dx32)
    for name, g, g32, p in (("dweight", dw, dw32, w), ("dbias", db, db32, b)):
        if p is None:
            assert g.numel() == 0 and g.dtype == dtype
        else:
            assert_rounded_from(name, g, g32)  # float32 partial sums, rounded once at the end


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_non_contiguous_input(dtype):
    x = randn(64, 40, dtype=dtype).t()  # (40, 64), stride (1, 40)
    grad = randn(64, 40, dtype=dtype).t()
    assert not x.is_contiguous() and not grad.is_contiguous()
    w, b = randn(64, dtype=dtype), randn(64, dtype=dtype)
    leaves = leaf_copies(x, w, b)
    assert leaves[0].stride() == x.stride()  # clone() keeps the strides
    ours = _run(ff.layer_norm, *leaves, (64,), grad)
    dense = _run(ff.layer_norm, *leaf_copies(x.contiguous(), w, b), (64,), grad.contiguous())
    for name, o, d in zip(("out", "dx", "dweight", "dbias"), ours, dense):
        assert torch.equal(o, d), name
    if dtype == torch.float32:
        torch.testing.assert_close(ours[0], F.layer_norm(x, (64,), w, b))


def test_layer_norm_gradcheck():
    x = randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    w = randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ff.layer_norm(x, (4, 7), w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: ff.layer_norm(x, (7,)), (x,))


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_opcheck(affine):
    x = randn(5, 3, 24, requires_grad=True)
    w = randn(24, requires_grad=True) if affine else None
    b = randn(24, requires_grad=True) if affine else None
    torch.library.opcheck(torch.ops.fusedformer.layer_norm_fwd.default, (x, [24], w, b, 1e-5))
    w, b = (t.detach() if t is not None else None for t in (w, b))
    y, mean, rstd = torch.ops.fusedformer.layer_norm_fwd(x.detach(), [24], w, b, 1e-5)
    torch.library.opcheck(
        torch.ops.fusedformer.layer_norm_bwd.default, (randn(5, 3, 24), x.detach(), [24], mean, rstd, w, b)
    )


def test_layer_norm_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w, b: ff.layer_norm(x, (48,), w, b).square().sum(), fullgraph=True)
    x, w, b = leaf_copies(randn(6, 48), randn(48), randn(48))
    fn(x, w, b).backward()
    x2, w2, b2 = leaf_copies(x, w, b)
    F.layer_norm(x2, (48,), w2, b2).square().sum().backward()
    for a, e in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(a, e)


def test_layer_norm_served_by_fused_kernel():
    x = randn(8, 32)
    assert ff.explain(ff.layer_norm, x, (32,)).backend == "cpp"


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((randn(4, 8), (7,)), {}, ValueError, "normalized_shape"),
        ((randn(4, 8), (8,)), {"weight": randn(7)}, ValueError, "weight"),
        ((randn(4, 8), (8,)), {"bias": randn(8, dtype=torch.float64)}, TypeError, "bias"),
        ((torch.ones(4, 8, dtype=torch.int64), (8,)), {}, TypeError, "floating-point"),
        ((randn(4, 8), "eight"), {}, TypeError, "normalized_shape"),
        ((randn(4, 8), ()), {}, ValueError, "normalized_shape"),
    ],
)
def test_layer_norm_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ff.layer_norm(*args, **kwargs)


def test_layer_norm_op_checks_its_inputs():
    with pytest.raises(RuntimeError, match="normalized_shape"):
        torch.ops.fusedformer.layer_norm_fwd(randn(4, 8), [9], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="mean"):
        torch.ops.fusedformer.layer_norm_bwd(randn(4, 8), randn(4, 8), [8], randn(3), randn(4), None, None)
