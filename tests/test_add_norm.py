"""fusedformer.add_layer_norm / add_rms_norm and the fusedformer::add_*_norm_fwd/bwd ops against the
composite (x + r, then the norm) in float64, with gradients through both outputs, and the fused dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer import reference
from fusedformer.ops.add_norm import add_norm_dropout_mask
from tests.conftest import DTYPES, assert_error_within, leaf_copies, randn

SHAPES = [((1, 1), (1,)), ((17, 97), (97,)), ((3, 5, 1025), (1025,)), ((2, 4, 17, 3), (17, 3))]
FAMILIES = ["layer", "rms"]


def _fused(family):
    return ff.add_layer_norm if family == "layer" else ff.add_rms_norm


def _composite(family, x, r, ns, w, b, eps, norm=None):
    """torch's own composite in the tensors' dtype: h = x + r, then F.layer_norm / F.rms_norm."""
    h = x + r
    if family == "layer":
        return (norm or F.layer_norm)(h, ns, w, b, eps), h
    return (norm or F.rms_norm)(h, ns, w, eps), h


def _ours(family, x, r, ns, w, b, eps):
    if family == "layer":
        return ff.add_layer_norm(x, r, ns, w, b, eps)
    return ff.add_rms_norm(x, r, ns, w, eps)


def _run(fn, family, tensors, ns, eps, g_out, g_res):
    """Forward, then backward through both outputs: loss = <out, g_out> + <residual_out, g_res>."""
    x, r, w, b = tensors
    out, res = fn(family, x, r, ns, w, b, eps)
    torch.autograd.backward([out, res], [g_out, g_res])
    grads = [t.grad if t is not None else None for t in (x, r, w, b)]
    return [out, res, *grads]


def _leaves(x, r, w, b, dtype):
    ps = leaf_copies(*[t for t in (x, r, w, b) if t is not None], dtype=dtype)
    it = iter(ps)
    return [next(it) if t is not None else None for t in (x, r, w, b)]


NAMES = ("out", "residual_out", "dinput", "dresidual", "dweight", "dbias")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,ns", SHAPES)
def test_add_norm_2x_rule(family, dtype, shape, ns):
    x, r = randn(*shape, dtype=dtype, scale=2.0), randn(*shape, dtype=dtype, offset=1.0)
    w = randn(*ns, dtype=dtype)
    b = randn(*ns, dtype=dtype) if family == "layer" else None
    g_out, g_res = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    eps = 1e-5 if family == "layer" else torch.finfo(dtype).eps
    # the truth: float64 on the same inputs, with h rounded to dtype as both computations round it
    truth = _run(lambda f, x, r, *a: _composite(f, x, r, *a), family, _leaves(x, r, w, b, torch.float64), ns, eps,
                 g_out.double(), g_res.double())  # fmt: skip
    truth[1] = (x + r).double()  # residual_out in dtype is h rounded; compare it to that
    ours = _run(_ours, family, _leaves(x, r, w, b, dtype), ns, None if family == "rms" else eps, g_out, g_res)
    torchs = _run(_composite, family, _leaves(x, r, w, b, dtype), ns, eps, g_out, g_res)
    assert torch.equal(ours[1], x + r)  # residual_out is exactly the composite's x + r
    for name, o, t, tr, factor in zip(NAMES, ours, torchs, truth, (2, 2, 3, 3, 3, 3)):
        if tr is not None:
            assert o.dtype == dtype
            if name != "residual_out":
                assert_error_within(name, o, t, tr, factor)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape,ns", SHAPES)
def test_add_norm_float64_matches_composite(family, shape, ns):
    """float64: the composite's outputs and every gradient to float64 rounding."""
    x, r = randn(*shape, dtype=torch.float64), randn(*shape, dtype=torch.float64)
    w = randn(*ns, dtype=torch.float64)
    b = randn(*ns, dtype=torch.float64) if family == "layer" else None
    g_out, g_res = randn(*shape, dtype=torch.float64), randn(*shape, dtype=torch.float64)
    ours = _run(_ours, family, _leaves(x, r, w, b, None), ns, 1e-6, g_out, g_res)
    composite = _run(_composite, family, _leaves(x, r, w, b, None), ns, 1e-6, g_out, g_res)
    for name, o, c in zip(NAMES, ours, composite):
        if c is not None:
            torch.testing.assert_close(o, c, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_norm_every_capability(each_cpu_capability, family, dtype):
    shape, ns = (9, 300), (300,)
    x, r, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(*ns, dtype=dtype)
    b = randn(*ns, dtype=dtype) if family == "layer" else None
    g_out, g_res = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    ours = _run(_ours, family, _leaves(x, r, w, b, None), ns, 1e-5, g_out, g_res)
    torchs = _run(_composite, family, _leaves(x, r, w, b, None), ns, 1e-5, g_out, g_res)
    truth = _run(_composite, family, _leaves(x + r, torch.zeros_like(r), w, b, torch.float64), ns, 1e-5,
                 g_out.double(), g_res.double())  # fmt: skip
    for name, o, t, tr, factor in zip(NAMES, ours, torchs, truth, (2, 0, 3, 3, 3, 3)):
        if tr is not None and factor:
            assert_error_within(f"{name} [{each_cpu_capability}]", o, t, tr, factor)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("used", ["out", "residual_out"])
def test_add_norm_gradient_through_one_output(family, used):
    x, r, w = randn(5, 40), randn(5, 40), randn(40)
    ours = _leaves(x, r, w, None, None)
    theirs = _leaves(x, r, w, None, None)
    out, res = _ours(family, ours[0], ours[1], (40,), ours[2], None, 1e-5)
    out2, res2 = _composite(family, theirs[0], theirs[1], (40,), theirs[2], None, 1e-5)
    ((out if used == "out" else res) * 3).sum().backward()
    ((out2 if used == "out" else res2) * 3).sum().backward()
    for a, e in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(a.grad, e.grad)
    if used == "out":
        torch.testing.assert_close(ours[2].grad, theirs[2].grad)


def _op_call(family, x, r, w, b, eps, p, seed):
    if family == "layer":
        out, res, _, _ = torch.ops.fusedformer.add_layer_norm_fwd(x, r, [x.shape[-1]], w, b, eps, p, seed)
    else:
        out, res, _ = torch.ops.fusedformer.add_rms_norm_fwd(x, r, [x.shape[-1]], w, eps, p, seed)
    return out, res


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_add_norm_dropout_is_the_mask_applied(each_cpu_capability, family, dtype, p):
    """out and every gradient equal the composite's with the mask add_norm_dropout_mask draws; the
    backward draws the same mask again (its input gradient is zero exactly where the mask drops)."""
    rows, cols, seed = 37, 97, 1234
    x, r, w = randn(rows, cols, dtype=dtype), randn(rows, cols, dtype=dtype), randn(cols, dtype=dtype)
    b = randn(cols, dtype=dtype) if family == "layer" else None
    g_out, g_res = randn(rows, cols, dtype=dtype), randn(rows, cols, dtype=dtype)
    keep = add_norm_dropout_mask(rows, cols, p, seed)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05

    def ours_fn(f, x, r, ns, w, b, eps):
        return _op_call(f, x, r, w, b, eps, p, seed)

    def composite_fn(f, x, r, ns, w, b, eps):
        xd = (x * keep.to(x.dtype) / (1 - p)).to(x.dtype)
        return _composite(f, xd, r, ns, w, b, eps)

    ours = _run(ours_fn, family, _leaves(x, r, w, b, None), (cols,), 1e-5, g_out, g_res)
    comp = _run(composite_fn, family, _leaves(x, r, w, b, None), (cols,), 1e-5, g_out, g_res)
    assert (ours[2][~keep] == 0).all() and (ours[1] - r)[~keep].eq(0).all()  # dropped: no value, no gradient
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 0.1}[dtype]
    for name, o, c in zip(NAMES, ours, comp):
        if c is not None:
            torch.testing.assert_close(o, c, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_add_norm_dropout_masks_differ_by_seed_and_row():
    a, b = add_norm_dropout_mask(64, 128, 0.5, 1), add_norm_dropout_mask(64, 128, 0.5, 2)
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    assert add_norm_dropout_mask(4, 8, 0.0, 1).all()


def test_add_norm_public_dropout_reproducible_with_manual_seed():
    x, r = randn(8, 64), randn(8, 64)
    torch.manual_seed(7)
    a = ff.add_rms_norm(x, r, (64,), dropout_p=0.3)
    torch.manual_seed(7)
    b = ff.add_rms_norm(x, r, (64,), dropout_p=0.3)
    c = ff.add_rms_norm(x, r, (64,), dropout_p=0.3)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    dropped = (a[1] - r) == 0
    assert 0.2 < dropped.float().mean().item() < 0.4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_add_norm_gradcheck(family, p):
    x, r = randn(3, 2, 7, dtype=torch.float64, requires_grad=True), randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    w = randn(7, dtype=torch.float64, requires_grad=True)
    b = randn(7, dtype=torch.float64, requires_grad=True)
    if family == "layer":
        fn = lambda x, r, w, b: _op_call("layer", x, r, w, b, 1e-5, p, 99)  # noqa: E731
        args = (x, r, w, b)
    else:
        fn = lambda x, r, w: _op_call("rms", x, r, w, None, 1e-5, p, 99)  # noqa: E731
        args = (x, r, w)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_add_norm_opcheck(family, p):
    x, r, w, b = randn(5, 3, 24, requires_grad=True), randn(5, 3, 24, requires_grad=True), randn(24), randn(24)
    ns = [24]
    if family == "layer":
        fwd, bwd = torch.ops.fusedformer.add_layer_norm_fwd, torch.ops.fusedformer.add_layer_norm_bwd
        torch.library.opcheck(fwd.default, (x, r, ns, w, b, 1e-5, p, 5))
        _, h, mean, rstd = fwd(x.detach(), r.detach(), ns, w, b, 1e-5, p, 5)
        torch.library.opcheck(bwd.default, (randn(5, 3, 24), randn(5, 3, 24), h, ns, mean, rstd, w, b, p, 5))
        torch.library.opcheck(bwd.default, (randn(5, 3, 24), None, h, ns, mean, rstd, None, None, p, 5))
    else:
        fwd, bwd = torch.ops.fusedformer.add_rms_norm_fwd, torch.ops.fusedformer.add_rms_norm_bwd
        torch.library.opcheck(fwd.default, (x, r, ns, w, 1e-5, p, 5))
        _, h, rstd = fwd(x.detach(), r.detach(), ns, w, 1e-5, p, 5)
        torch.library.opcheck(bwd.default, (randn(5, 3, 24), randn(5, 3, 24), h, ns, rstd, w, p, 5))
        torch.library.opcheck(bwd.default, (randn(5, 3, 24), None, h, ns, rstd, None, p, 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_add_norm_compile_fullgraph(family):
    torch._dynamo.reset()

    def f(x, r, w):
        out, res = _ours(family, x, r, (48,), w, None, 1e-5)
        return out.square().sum() + (res * 2).sum()

    fn = torch.compile(f, fullgraph=True)
    x, r, w = leaf_copies(randn(6, 48), randn(6, 48), randn(48))
    fn(x, r, w).backward()
    x2, r2, w2 = leaf_copies(x, r, w)
    out, res = _composite(family, x2, r2, (48,), w2, None, 1e-5)
    (out.square().sum() + (res * 2).sum()).backward()
    for a, e in ((x.grad, x2.grad), (r.grad, r2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(a, e)


def test_add_norm_served_by_fused_kernel():
    x, r = randn(8, 32), randn(8, 32)
    assert ff.explain(ff.add_layer_norm, x, r, (32,)).backend == "cpp"
    assert ff.explain(ff.add_rms_norm, x, r, (32,), dropout_p=0.1).backend == "cpp"


@pytest.mark.parametrize(
    "fn,args,kwargs,error,match",
    [
        (ff.add_layer_norm, (randn(4, 8), randn(4, 7), (8,)), {}, ValueError, "residual"),
        (ff.add_rms_norm, (randn(4, 8), randn(4, 8, dtype=torch.float64), (8,)), {}, TypeError, "residual"),
        (ff.add_rms_norm, (randn(4, 8), None, (8,)), {}, TypeError, "residual"),
        (ff.add_layer_norm, (randn(4, 8), randn(4, 8), (8,)), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        (ff.add_rms_norm, (randn(4, 8), randn(4, 8), (7,)), {}, ValueError, "normalized_shape"),
    ],
)
def test_add_norm_bad_input(fn, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


def test_add_norm_reference_composite():
    """The reference the fallback path runs is the composite."""
    x, r, w = randn(4, 16, dtype=torch.float64), randn(4, 16, dtype=torch.float64), randn(16, dtype=torch.float64)
    out, h = reference.add_rms_norm(x, r, (16,), w, 1e-6)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(out, F.rms_norm(x + r, (16,), w, 1e-6))
