"""fusedformer.gelu (bias fused) and the fusedformer::gelu_fwd/bwd ops against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer import reference
from tests.conftest import DTYPES, HALF_DTYPES, assert_error_within, assert_rounded_from, leaf_copies, randn

SHAPES = [(1,), (17, 97), (3, 5, 1025), (256, 64), (2, 33)]


def _torch_gelu(x, approximate, bias):
    return F.gelu(x + bias if bias is not None else x, approximate=approximate)


def _run(fn, x, b, approximate, grad):
    out = fn(x, approximate, b)
    out.backward(grad)
    return out, x.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gelu_matches_reference(dtype, shape, approximate, with_bias):
    x = randn(*shape, dtype=torch.float64, scale=3.0)  # reaches the tails of erf/tanh
    b = randn(shape[-1], dtype=torch.float64) if with_bias else None
    grad = randn(*shape, dtype=torch.float64)

    def copies(dt):
        if b is None:
            return leaf_copies(x, dtype=dt)[0], None
        return tuple(leaf_copies(x, b, dtype=dt))

    truth = _run(reference.gelu, *copies(torch.float64), approximate, grad)
    ours = _run(ff.gelu, *copies(dtype), approximate, grad.to(dtype))
    torchs = _run(_torch_gelu, *copies(dtype), approximate, grad.to(dtype))
    for name, o, t, r, factor in zip(("out", "dx", "dbias"), ours, torchs, truth, (2, 3, 3)):
        if r is not None:
            assert o.dtype == dtype
            assert_error_within(name, o, t, r, factor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_every_capability(each_cpu_capability, approximate, dtype):
    x, b = randn(40, 333, dtype=dtype, scale=3.0), randn(333, dtype=dtype)
    grad = randn(40, 333, dtype=dtype)
    truth = _run(reference.gelu, *leaf_copies(x, b, dtype=torch.float64), approximate, grad.double())
    ours = _run(ff.gelu, *leaf_copies(x, b), approximate, grad)
    torchs = _run(_torch_gelu, *leaf_copies(x, b), approximate, grad)
    for name, o, t, r, factor in zip(("out", "dx", "dbias"), ours, torchs, truth, (2, 3, 3)):
        assert o.dtype == dtype
        assert_error_within(f"{name} [{each_cpu_capability}]", o, t, r, factor)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 40, 97, 1025])  # a tail only, none, 1 lane, 8 lanes, ...
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gelu_half_is_the_float32_kernel_rounded_once(
    each_cpu_capability, dtype, cols, approximate, with_bias
):
    """bf16/fp16 tensors are read and written in their dtype, and in between the kernel is the float32
    one (x + bias included): the same bits as the float32 op on the widened tensors, rounded once."""
    x, dy = randn(9, cols, dtype=dtype, scale=3.0), randn(9, cols, dtype=dtype)
    b = randn(cols, dtype=dtype) if with_bias else None
    b32 = b.float() if with_bias else None
    y = torch.ops.fusedformer.gelu_fwd(x, b, approximate)
    assert_rounded_from("out", y, torch.ops.fusedformer.gelu_fwd(x.float(), b32, approximate))
    dx, db = torch.ops.fusedformer.gelu_bwd(dy, x, b, approximate)
    dx32, db32 = torch.ops.fusedformer.gelu_bwd(dy.float(), x.float(), b32, approximate)
    assert_rounded_from("dx", dx, dx32)
    if with_bias:
        assert_rounded_from("dbias", db, db32)  # float32 partial sums, rounded once at the end
    else:
        assert db.numel() == 0 and db.dtype == dtype


def test_gelu_special_values():
    # extreme finite inputs: the tails of erf/tanh and of the polynomial exp must not overflow to NaN
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, 10.0, -10.0, 80.0, -80.0, 1e4, -1e4])
    for approximate in ("none", "tanh"):
        torch.testing.assert_close(ff.gelu(x, approximate), F.gelu(x, approximate=approximate))
        x_ = x.clone().requires_grad_()
        ff.gelu(x_, approximate).sum().backward()
        assert torch.isfinite(x_.grad).all()
    assert ff.gelu(torch.tensor([float("nan")])).isnan().all()
    # torch's exact GELU overflows to inf at 3e38 and gives NaN at +inf; the right values are x itself
    big = torch.tensor([3e38, float("inf")])
    assert torch.equal(ff.gelu(big), big)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gelu_half_special_values(dtype, each_cpu_capability):
    # the float32 kernel's answers, rounded: overflow to inf, inf, NaN and the tails stay as they are
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, 10.0, -10.0, 80.0, -80.0, 1e4, -1e4, 6e4, 3e38])
    x = torch.cat([x, torch.tensor([float("inf"), -float("inf"), float("nan")])]).to(dtype)
    for approximate in ("none", "tanh"):
        wide = torch.ops.fusedformer.gelu_fwd(x.float(), None, approximate)
        assert_rounded_from("out", torch.ops.fusedformer.gelu_fwd(x, None, approximate), wide)
    assert ff.gelu(x[-1:]).isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_non_contiguous_and_empty(dtype):
    x, grad, b = randn(64, 40, dtype=dtype).t(), randn(64, 40, dtype=dtype).t(), randn(64, dtype=dtype)
    assert not x.is_contiguous() and not grad.is_contiguous()
    leaves = leaf_copies(x, b)
    assert leaves[0].stride() == x.stride()  # clone() keeps the strides
    ours = _run(ff.gelu, *leaves, "none", grad)
    dense = _run(ff.gelu, *leaf_copies(x.contiguous(), b), "none", grad.contiguous())
    for name, o, d in zip(("out", "dx", "dbias"), ours, dense):
        assert torch.equal(o, d), name
    if dtype == torch.float32:
        torch.testing.assert_close(ff.gelu(x), F.gelu(x))
    assert ff.gelu(torch.empty(0, 8, dtype=dtype)).shape == (0, 8)


def test_gelu_gradcheck():
    x = randn(4, 9, dtype=torch.float64, scale=2.0, requires_grad=True)
    b = randn(9, dtype=torch.float64, requires_grad=True)
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(lambda x, b: ff.gelu(x, approximate, b), (x, b))
        assert torch.autograd.gradcheck(lambda x: ff.gelu(x, approximate), (x,))


@pytest.mark.parametrize("with_bias", [True, False])
def test_gelu_opcheck(with_bias):
    x = randn(6, 40, requires_grad=True)
    b = randn(40, requires_grad=True) if with_bias else None
    for approximate in ("none", "tanh"):
        torch.library.opcheck(torch.ops.fusedformer.gelu_fwd.default, (x, b, approximate))
        b_ = b.detach() if b is not None else None
        torch.library.opcheck(torch.ops.fusedformer.gelu_bwd.default, (randn(6, 40), x.detach(), b_, approximate))


def test_gelu_double_backward_is_an_error():
    x = randn(4, 8, requires_grad=True)
    (g,) = torch.autograd.grad(ff.gelu(x).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


def test_gelu_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, b: ff.gelu(x, "tanh", b).square().sum(), fullgraph=True)
    x, b = leaf_copies(randn(8, 48), randn(48))
    fn(x, b).backward()
    x2, b2 = leaf_copies(x, b)
    _torch_gelu(x2, "tanh", b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((randn(4, 8),), {"approximate": "fast"}, ValueError, "approximate"),
        ((randn(4, 8),), {"bias": randn(7)}, ValueError, "bias"),
        ((randn(4, 8),), {"bias": randn(8, dtype=torch.float64)}, TypeError, "bias"),
        ((torch.ones(4, 8, dtype=torch.int32),), {}, TypeError, "floating-point"),
    ],
)
def test_gelu_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ff.gelu(*args, **kwargs)


def test_gelu_op_checks_its_inputs():
    with pytest.raises(RuntimeError, match="approximate"):
        torch.ops.fusedformer.gelu_fwd(randn(4, 8), None, "fast")
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.fusedformer.gelu_fwd(randn(4, 8), randn(3), "none")
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.fusedformer.gelu_bwd(randn(4, 7), randn(4, 8), None, "none")
