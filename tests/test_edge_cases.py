"""Edge cases against torch, on both kernel backends: the C++ ops (``torch.ops.fusedformer``) and the Triton
launchers (fusedformer/kernels/, run by Triton's interpreter on CPU tensors, as in test_triton.py).

- LayerNorm of normalized size 0: an empty output, mean 0 and rstd NaN per row as torch's
  native_layer_norm, and empty gradients (weight/bias gradients zeros of shape (0,)).
- Zero-size batches for LayerNorm, GELU and attention: empty outputs, zero parameter gradients.
- GELU at huge |x| and at ±inf / NaN: the forward and both backwards give what torch gives, NaN for NaN
  (the tanh backward at |x| ~ 1e19 used to give 0·inf = NaN where torch gives 1 or 0).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before fusedformer.kernels is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusedformer as ff  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _triton():
    pytest.importorskip("triton")
    from fusedformer.kernels import _common, gelu, layer_norm

    if not _common.INTERPRET:
        pytest.skip("fusedformer.kernels was imported without TRITON_INTERPRET=1: it cannot run on the CPU")
    return gelu, layer_norm


def _ln_ops(backend):
    if backend == "cpp":
        return torch.ops.fusedformer.layer_norm_fwd, torch.ops.fusedformer.layer_norm_bwd
    _, ln = _triton()
    return ln.layer_norm_forward, ln.layer_norm_backward


def _gelu_ops(backend):
    if backend == "cpp":
        return torch.ops.fusedformer.gelu_fwd, torch.ops.fusedformer.gelu_bwd
    g, _ = _triton()
    return g.gelu_forward, g.gelu_backward


def _same(name, ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (name, ours.shape, theirs.shape)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(3,), (2, 5), (0,)])
def test_layer_norm_of_width_zero_matches_torch(backend, dtype, lead, monkeypatch):
    fwd, bwd = _ln_ops(backend)
    x = torch.randn(*lead, 0).to(dtype)
    w, b = torch.randn(0).to(dtype), torch.randn(0).to(dtype)
    y, mean, rstd = fwd(x, [0], w, b, 1e-5)
    y_t, mean_t, rstd_t = torch.ops.aten.native_layer_norm(x, [0], w, b, 1e-5)
    _same("out", y, y_t)
    # torch's statistics are in the input's dtype for float64/float32, ours in the accumulation dtype
    _same("mean", mean.to(mean_t.dtype).reshape(mean_t.shape), mean_t)
    _same("rstd", rstd.to(rstd_t.dtype).reshape(rstd_t.shape), rstd_t)
    dx, dw, db = bwd(torch.randn(*lead, 0).to(dtype), x, [0], mean, rstd, w, b)
    assert dx.shape == x.shape and dw.shape == (0,) and db.shape == (0,)
    if backend == "triton":  # the Triton backend serves CUDA tensors: its launchers were checked above
        return
    # the public function, with autograd, against torch's
    xs = [t.clone().requires_grad_() for t in (x, w, b)]
    xt = [t.clone().requires_grad_() for t in (x, w, b)]
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "cpp")
    out = ff.layer_norm(xs[0], [0], xs[1], xs[2])
    _same("out", out, F.layer_norm(xt[0], [0], xt[1], xt[2]))
    out.sum().backward()
    F.layer_norm(xt[0], [0], xt[1], xt[2]).sum().backward()
    for name, a, t in zip(("dx", "dw", "db"), xs, xt):
        _same(name, a.grad, t.grad)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_of_an_empty_batch(backend, dtype):
    fwd, bwd = _ln_ops(backend)
    x = torch.randn(0, 4, 17).to(dtype)
    w, b = torch.randn(17).to(dtype), torch.randn(17).to(dtype)
    y, mean, rstd = fwd(x, [17], w, b, 1e-5)
    assert y.shape == x.shape and mean.numel() == 0 and rstd.numel() == 0
    dx, dw, db = bwd(torch.randn(0, 4, 17).to(dtype), x, [17], mean, rstd, w, b)
    assert dx.shape == x.shape
    _same("dw", dw, torch.zeros(17, dtype=dtype))
    _same("db", db, torch.zeros(17, dtype=dtype))


# float32 values where the tanh backward's intermediate terms overflow: x³ (past ~7e12), x² (past ~1.8e19).
# Not near float32's max (3.4e38): there torch's erf forward overflows in x·(1 + erf) to inf where the
# true gelu(x) = x is finite, and ours gives x; that difference is deliberate.
HUGE = [1e10, -1e10, 1e13, -1e13, 1e19, -1e19, 2e19, -2e19, 1e30, -1e30]
SPECIAL = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0]


def _torch_gelu(x, approximate):
    """torch's gelu and its gradient (dy = 1) at ``x``."""
    xt = x.clone().requires_grad_()
    y = F.gelu(xt, approximate=approximate)
    y.backward(torch.ones_like(x))
    return y.detach(), xt.grad


def _agrees(ours: torch.Tensor, *answers: torch.Tensor) -> bool:
    """``ours`` equals one of torch's ``answers`` in kind (the same NaN, inf, or a finite value within
    float tolerance), at every element."""
    ok = torch.zeros_like(ours, dtype=torch.bool)
    for a in answers:
        a = a.to(ours.dtype)
        same_special = (ours.isnan() & a.isnan()) | (~a.isfinite() & ~a.isnan() & (ours == a))
        both_finite = ours.isfinite() & a.isfinite()
        close = (ours.double() - a.double()).abs() <= 1e-5 * a.double().abs() + 1e-30
        ok |= same_special | (both_finite & close)
    return bool(ok.all())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_at_huge_and_special_inputs_matches_torch(backend, approximate, dtype):
    """torch's answer, in the same dtype or, where torch's own code paths disagree (its vectorised float32
    erf gives gelu(+inf) = NaN, its scalar and float64 paths inf), in float64."""
    fwd, bwd = _gelu_ops(backend)
    vals = HUGE + SPECIAL + ([1e200, -1e200, 1e160, -1e160] if dtype == torch.float64 else [])
    # 17 columns: a vector body and a tail in the C++ kernels
    x = torch.tensor(vals, dtype=dtype).repeat_interleave(17).reshape(-1, 17)
    y_t, dx_t = _torch_gelu(x, approximate)
    y_64, dx_64 = _torch_gelu(x.double(), approximate)
    y = fwd(x, None, approximate)
    dx, _ = bwd(torch.ones_like(x), x, None, approximate)
    for i, v in enumerate(vals):
        assert _agrees(y[i], y_t[i], y_64[i]), f"gelu({v}): {y[i][0]} vs torch {y_t[i][0]} / {y_64[i][0]}"
        assert _agrees(dx[i], dx_t[i], dx_64[i]), f"gelu'({v}): {dx[i][0]} vs torch {dx_t[i][0]} / {dx_64[i][0]}"


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gelu_half_types_keep_nan_and_inf(approximate, dtype, monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "cpp")
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e4, -1e4, 0.0] * 3, dtype=dtype)
    xs = x.clone().requires_grad_()
    y = ff.gelu(xs, approximate=approximate)
    y.sum().backward()
    y_t, dx_t = _torch_gelu(x, approximate)
    y_64, dx_64 = _torch_gelu(x.double(), approximate)
    assert _agrees(y.detach(), y_t, y_64), (y, y_t, y_64)
    # float16/bfloat16 tolerance for the finite gradients: torch's own rounding of them
    dx_64r = dx_64.to(dtype)
    assert _agrees(xs.grad.float(), dx_t.float(), dx_64r.float()), (xs.grad, dx_t, dx_64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_of_an_empty_batch(dtype, monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "cpp")
    x = torch.randn(0, 33).to(dtype).requires_grad_()
    bias = torch.randn(33).to(dtype).requires_grad_()
    y = ff.gelu(x, bias=bias)
    assert y.shape == (0, 33)
    y.sum().backward()
    assert x.grad.shape == (0, 33)
    _same("grad_bias", bias.grad, torch.zeros(33, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 2, 5, 16), (2, 2, 0, 16)])
def test_attention_of_an_empty_batch_or_no_queries(dtype, shape, monkeypatch):
    B, H, L, E = shape
    q = torch.randn(B, H, L, E).to(dtype).requires_grad_()
    k = torch.randn(B, H, 7, E).to(dtype).requires_grad_()
    v = torch.randn(B, H, 7, E).to(dtype).requires_grad_()
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "cpp")
    out = ff.scaled_dot_product_attention(q, k, v, is_causal=False)
    out.sum().backward()
    assert out.shape == (B, H, L, E)
    assert q.grad.shape == q.shape
    _same("grad_key", k.grad, torch.zeros_like(k))
    _same("grad_value", v.grad, torch.zeros_like(v))
