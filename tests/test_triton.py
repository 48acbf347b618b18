"""The Triton kernels (fusedformer/kernels/), run by Triton's interpreter on CPU tensors, against the float64 reference.

No machine of this project has a GPU: ``TRITON_INTERPRET=1`` (set below, before anything imports the
kernels) makes ``@triton.jit`` run the very kernel source in numpy. The launchers are called
directly. The rule, per output: error(kernel) <= 2 x error(reference in the same dtype,
``upcast=False``) for outputs and 3 x for gradients, both max-abs against the reference in float64 on
the same (rounded) inputs, plus a tiny absolute floor for where the reference is exact (``_FLOOR``).

Rows with no key to attend to: the reference's softmax backward gives NaN there (its forward fills 0),
so both references are computed with those rows' keys unmasked and their output gradient zeroed, which
is the exact gradient of a row whose output is the constant 0 (``_attention_ref``). The kernels get the
real mask and gradient.

Tests marked ``gpu`` run the same checks on CUDA tensors with compiled kernels; they need a GPU and
``TRITON_INTERPRET=0``. Two tests cover the compiled path without a GPU, each in a subprocess with
``TRITON_INTERPRET=0``: ``test_kernels_compile_for_gpu`` compiles the kernels to sm_80 binaries, and
``test_launchers_trace_with_fake_tensors`` traces the launchers as torch.compile would.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton or fusedformer.kernels is imported

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from fusedformer import reference  # noqa: E402
from tests.conftest import check_compiled_dropout  # noqa: E402
from fusedformer.kernels import _common  # noqa: E402
from fusedformer.kernels.attention import attention_backward, attention_forward  # noqa: E402
from fusedformer.kernels.gelu import gelu_backward, gelu_forward  # noqa: E402
from fusedformer.kernels.layer_norm import (  # noqa: E402
    MAX_BLOCK_D,
    add_layer_norm_backward,
    add_layer_norm_forward,
    add_rms_norm_backward,
    add_rms_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)

interpreted = pytest.mark.skipif(
    not _common.INTERPRET,
    reason="fusedformer.kernels was imported with TRITON_INTERPRET unset or 0 (compiled for a GPU); "
    "the CPU tests need TRITON_INTERPRET=1 set before the first import of the kernels",
)


def on_gpu(test):
    """The same checks on CUDA tensors with compiled kernels: skipped without a GPU."""
    marks = (
        pytest.mark.gpu,
        pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no GPU available (torch.cuda.is_available() is False)"
        ),
        pytest.mark.skipif(
            _common.INTERPRET, reason="kernels interpreted in this session; run with TRITON_INTERPRET=0"
        ),
    )
    for mark in marks:
        test = mark(test)
    return test


ATTN_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Absolute floor, times max(1, max|truth|): where the reference in the same dtype is exact (float64
# against itself; a query that sees a single key, whose dq is exactly 0 in any dtype), 2x of 0 is no
# bound. float32: 2e-6, ~16 ulps of 1 (the project's float32 floor, tests/conftest.py); float16 and
# bfloat16: about 1% of an ulp of 1 (9.8e-4 and 7.8e-3), far below any rounding they can show.
_FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def _err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth.double()).abs().max().item() if x.numel() else 0.0


def _check(name: str, ours: torch.Tensor, same_dtype: torch.Tensor, truth: torch.Tensor, factor: float):
    """error(ours) <= factor x error(reference in ours' dtype) + floor, both against the float64 truth.

    Where the reference in ours' dtype is not finite (float16 LayerNorm of a single column overflows
    in rsqrt's gradient), its error counts as one rounding of the truth's scale.
    """
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err, err_ref = _err(ours, truth), _err(same_dtype, truth)
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    if not math.isfinite(err_ref):  # the reference overflowed in this dtype: hold ours to one rounding
        err_ref = torch.finfo(ours.dtype).eps * scale
    bound = factor * err_ref + _FLOOR[ours.dtype] * scale
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x reference's {err_ref:.3e} + floor {bound:.3e}"


def _randn(*shape, dtype, device="cpu", scale=1.0, offset=0.0) -> torch.Tensor:
    """Standard-normal data made in float64 and rounded once to ``dtype``."""
    return (torch.randn(*shape, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh data per test, reproducible from the test's id; FUSEDFORMER_TEST_SEED draws another sample
    salt = int(os.environ.get("FUSEDFORMER_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ salt)


# ---- attention ----------------------------------------------------------------------------------


def _dead_rows(mask, is_causal, B, Hq, L, S, device) -> torch.Tensor:
    """(B, Hq, L) bool: the query rows with no key to attend to."""
    allowed = torch.ones(B, Hq, L, S, dtype=torch.bool, device=device)
    if is_causal:
        allowed &= reference.causal_mask(L, S, device)
    if mask is not None:
        allowed &= mask if mask.dtype == torch.bool else mask != float("-inf")
    return ~allowed.any(-1)


def _attention_ref(q, k, v, grad, mask, is_causal, scale, dtype, upcast):
    """Output and gradients of the reference in ``dtype``; rows with no key get output 0, gradient 0."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    dead = _dead_rows(mask, is_causal, B, Hq, L, S, q.device)
    m = reference.causal_mask(L, S, q.device).expand(B, Hq, L, S) if is_causal else None
    if mask is not None and mask.dtype == torch.bool:
        m = mask.expand(B, Hq, L, S) & (m if m is not None else True)
    elif mask is not None:
        m = mask.to(dtype).expand(B, Hq, L, S)
        if is_causal:
            m = m.masked_fill(~reference.causal_mask(L, S, q.device), float("-inf"))
    if m is not None:  # unmask the dead rows: their zeroed output gradient then gives gradient 0
        m = m.masked_fill(dead[..., None], True if m.dtype == torch.bool else 0.0)
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = reference.scaled_dot_product_attention(
        *leaves, m, 0.0, False, scale, enable_gqa=True, upcast=upcast
    )
    out.backward(grad.to(dtype).masked_fill(dead[..., None], 0.0))
    return (out.detach().masked_fill(dead[..., None], 0.0), *(t.grad for t in leaves))


def _check_attention(q, k, v, mask=None, is_causal=False, scale=None, grad=None):
    """Runs the Triton forward and backward and holds each result to the rule; returns them."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    grad = _randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device) if grad is None else grad
    out, lse = attention_forward(q, k, v, mask, is_causal, scale)
    dq, dk, dv = attention_backward(grad, q, k, v, out, lse, mask, is_causal, scale)
    truth = _attention_ref(q, k, v, grad, mask, is_causal, scale, torch.float64, True)
    same = _attention_ref(q, k, v, grad, mask, is_causal, scale, q.dtype, False)
    results = (out, dq, dk, dv)
    for name, ours, s, t, factor in zip(("out", "dq", "dk", "dv"), results, same, truth, (2, 3, 3, 3)):
        assert ours.dtype == q.dtype and ours.is_contiguous()
        _check(name, ours, s, t, factor)
    # logsumexp: float32 natural log of the masked scores' exp-sum, +inf for rows with no key
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    dead = _dead_rows(mask, is_causal, B, Hq, L, S, q.device)
    assert lse.shape == (B, Hq, L) and lse.dtype == torch.float32
    assert torch.isposinf(lse[dead]).all() and torch.isfinite(lse[~dead]).all()
    return out, lse, (dq, dk, dv), grad


def _qkv(B, Hq, Hk, L, S, E, Ev, dtype, device="cpu"):
    return (
        _randn(B, Hq, L, E, dtype=dtype, device=device),
        _randn(B, Hk, S, E, dtype=dtype, device=device),
        _randn(B, Hk, S, Ev, dtype=dtype, device=device),
    )


# (L, S, E, Ev): awkward lengths (1, 17, 97, 113), L != S both ways, Ev != E, head dims 16..128
ATTN_SHAPES = [
    (1, 97, 64, 64),
    (17, 17, 16, 16),
    (97, 113, 59, 59),
    (113, 97, 80, 80),
    (64, 64, 128, 128),
    (97, 64, 64, 16),
]


@interpreted
@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L,S,E,Ev", ATTN_SHAPES)
def test_attention_matches_reference(dtype, is_causal, L, S, E, Ev):
    _check_attention(*_qkv(1, 2, 2, L, S, E, Ev, dtype), is_causal=is_causal)


def _mask(kind: str, B, Hq, L, S, dtype):
    """Masks of every broadcast form, with dead rows in the full ones."""
    if kind == "bool":  # (B, Hq, L, S), some rows wholly masked
        m = torch.rand(B, Hq, L, S) > 0.3
        m[0, 0, 3] = False
        m[-1, -1, -1] = False
        return m
    if kind == "float":  # (B, Hq, L, S) additive: -inf entries, a -inf row, finite large negatives
        m = _randn(B, Hq, L, S, dtype=torch.float64)
        m[torch.rand(B, Hq, L, S) < 0.2] = float("-inf")
        m[0, 0, 2] = float("-inf")
        m[0, -1, 4, : S // 2] = -1e4
        return m.to(dtype)
    if kind == "key_padding":  # (B, 1, 1, S): the last keys of each but the first batch are padding
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        for b in range(1, B):
            m[b, ..., S - 5 * b :] = False
        return m
    if kind == "float_2d":  # (L, S), broadcast over batch and heads
        return _randn(L, S, dtype=dtype)
    if kind == "bool_head":  # (Hq, 1, S): per head, over every query
        return torch.rand(Hq, 1, S) > 0.5
    raise ValueError(kind)


@interpreted
@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["bool", "float", "key_padding", "float_2d", "bool_head"])
def test_attention_masks(dtype, is_causal, kind):
    B, Hq, L, S = 2, 2, 33, 47
    mask = _mask(kind, B, Hq, L, S, dtype)
    _check_attention(*_qkv(B, Hq, Hq, L, S, 32, 24, dtype), mask=mask, is_causal=is_causal)


@interpreted
@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Hq,Hk", [(4, 2), (6, 1)])
def test_attention_gqa(dtype, is_causal, Hq, Hk):
    # a per-query-head mask checks that query head h reads mask head h and key head h // (Hq // Hk)
    B, L, S = 2, 40, 29
    mask = torch.rand(1, Hq, L, S) > 0.2
    _check_attention(*_qkv(B, Hq, Hk, L, S, 16, 16, dtype), mask=mask, is_causal=is_causal)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_long_causal(dtype):
    _check_attention(*_qkv(1, 1, 1, 256, 256, 64, 64, dtype), is_causal=True)


@interpreted
@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
def test_attention_head_dim_256_and_scale(dtype):
    # the largest head dims, padded to 256 in the kernel; a custom scale; a few blocks of keys
    _check_attention(*_qkv(1, 1, 1, 17, 40, 256, 200, dtype), is_causal=True, scale=0.11)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_huge_negative_mask_is_not_masking(dtype):
    # Hugging Face masks with finfo.min: a row whose keys all carry it is a uniform softmax, not a dead row;
    # its log-sum-exp (~ -3e38) is too coarse for the backward, which renormalises such rows
    B, Hq, L, S = 2, 2, 37, 45
    mask = torch.zeros(B, 1, L, S, dtype=dtype)
    mask[1, ..., S - 11 :] = torch.finfo(dtype).min  # padded keys
    mask[0, 0, :5] = torch.finfo(dtype).min  # padded queries: every key at finfo.min
    out, lse, _, _ = _check_attention(*_qkv(B, Hq, Hq, L, S, 16, 16, dtype), mask=mask, is_causal=True)
    assert torch.isfinite(lse).all()


@interpreted
def test_attention_rows_without_keys():
    # every row dead (all False), and S = 0: output 0, logsumexp +inf, gradients 0, never NaN
    q, k, v = _qkv(1, 2, 1, 19, 23, 16, 8, torch.float32)
    grad = torch.randn(1, 2, 19, 8)
    for mask, kv in ((torch.zeros(19, 23, dtype=torch.bool), (k, v)), (None, (k[:, :, :0], v[:, :, :0]))):
        out, lse = attention_forward(q, *kv, mask, False, 0.25)
        assert (out == 0).all() and torch.isposinf(lse).all()
        dq, dk, dv = attention_backward(grad, q, *kv, out, lse, mask, False, 0.25)
        assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()
    out, lse = attention_forward(q[:, :, :0], k, v, None, True, 0.25)  # L = 0
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)


@interpreted
def test_attention_any_strides_match_contiguous():
    # (B, L, H, E) tensors seen as (B, H, L, E), a sliced value, a transposed mask: read through their
    # strides (no copy), they give bit-identical results to contiguous copies
    B, H, L, S, E = 2, 3, 21, 26, 16
    q = torch.randn(B, L, H, E).transpose(1, 2)
    k = torch.randn(B, S, H, E).transpose(1, 2)
    v = torch.randn(B, H, S, 2 * E)[..., ::2]
    mask = torch.randn(B, H, S, L).transpose(-1, -2)
    grad = torch.randn(B, L, H, E).transpose(1, 2)
    contiguous = [t.contiguous() for t in (q, k, v, mask, grad)]
    out, lse, grads, _ = _check_attention(q, k, v, mask=mask, is_causal=True, grad=grad)
    q_c, k_c, v_c, mask_c, grad_c = contiguous
    out_c, lse_c, grads_c, _ = _check_attention(q_c, k_c, v_c, mask=mask_c, is_causal=True, grad=grad_c)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_c))


@interpreted
def test_attention_backward_is_deterministic():
    q, k, v = _qkv(2, 4, 2, 45, 45, 32, 32, torch.float32)
    grad = torch.randn(2, 4, 45, 32)
    out, lse = attention_forward(q, k, v, None, True, 0.2)
    first = attention_backward(grad, q, k, v, out, lse, None, True, 0.2)
    second = attention_backward(grad, q, k, v, out, lse, None, True, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@interpreted
def test_attention_rejects_what_it_cannot_run():
    q, k, v = _qkv(1, 2, 2, 8, 8, 16, 16, torch.float64)
    with pytest.raises(TypeError, match="float64 is not supported"):
        attention_forward(q, k, v, None, False, 0.25)
    q, k, v = _qkv(1, 3, 2, 8, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        attention_forward(q, k, v, None, False, 0.25)
    q, k, v = _qkv(1, 2, 2, 8, 8, 300, 16, torch.float32)
    with pytest.raises(ValueError, match="between 1 and 256"):
        attention_forward(q, k, v, None, False, 0.25)
    q, k, v = _qkv(1, 2, 2, 8, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention_forward(q, k, v, torch.ones(8, 7, dtype=torch.bool), False, 0.25)


# ---- LayerNorm ----------------------------------------------------------------------------------


def _layer_norm_ref(x, shape, w, b, grad, eps, dtype, upcast):
    leaves = [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = reference.layer_norm(leaves[0], shape, leaves[1], leaves[2], eps, upcast=upcast)
    y.backward(grad.to(dtype))
    return y.detach(), *(t.grad if t is not None else None for t in leaves)


def _check_layer_norm(x, shape, w, b, eps=1e-5, grad=None):
    grad = _randn(*x.shape, dtype=x.dtype, device=x.device) if grad is None else grad
    y, mean, rstd = layer_norm_forward(x, shape, w, b, eps)
    dx, dw, db = layer_norm_backward(grad, x, shape, mean, rstd, w, b)
    truth = _layer_norm_ref(x, shape, w, b, grad, eps, torch.float64, True)
    same = _layer_norm_ref(x, shape, w, b, grad, eps, x.dtype, False)
    names = ("out", "dx", "dweight", "dbias")
    for name, ours, s, t, factor in zip(names, (y, dx, dw, db), same, truth, (2, 3, 3, 3)):
        if t is None:
            assert ours.shape == (0,), f"{name}: expected an empty tensor without the parameter"
            continue
        assert ours.dtype == x.dtype and ours.is_contiguous()
        _check(name, ours, s, t, factor)
    # the saved statistics, as torch.native_layer_norm computes them
    lead = x.shape[: x.dim() - len(shape)]
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert mean.shape == lead and rstd.shape == lead and mean.dtype == stats and rstd.dtype == stats
    dims = tuple(range(-len(shape), 0))
    x64 = x.double()
    assert torch.allclose(mean.double(), x64.mean(dims), rtol=1e-5, atol=1e-6)
    assert torch.allclose(rstd.double(), (x64.var(dims, unbiased=False) + eps).rsqrt(), rtol=1e-5, atol=1e-6)
    return y, (dx, dw, db)


# (input shape, normalized_shape): one column, odd widths, a 2-D normalized shape, rows of 256, and rows
# wider than MAX_BLOCK_D (256 under the interpreter) that stream in chunks
LN_SHAPES = [
    ((3, 1), (1,)),
    ((17, 97), (97,)),
    ((4, 3, 17), (3, 17)),
    ((256, 64), (64,)),
    ((2, 3, 256), (256,)),
    ((7, 777), (777,)),
]


@interpreted
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,normalized_shape", LN_SHAPES, ids=str)
@pytest.mark.parametrize("affine", ["weight_bias", "none", "weight_only"])
def test_layer_norm_matches_reference(dtype, shape, normalized_shape, affine):
    x = _randn(*shape, dtype=dtype, scale=2.0, offset=0.5)
    w = _randn(*normalized_shape, dtype=dtype) if affine != "none" else None
    b = _randn(*normalized_shape, dtype=dtype) if affine == "weight_bias" else None
    _check_layer_norm(x, list(normalized_shape), w, b)


@interpreted
def test_layer_norm_chunked_path_is_reached(monkeypatch):
    # D = 777 > MAX_BLOCK_D: the backward takes the wide-row path (c1 and c2 per row in a launch of their own)
    from fusedformer.kernels import layer_norm as N

    launched = []
    wrap = torch.library.wrap_triton

    def spy(kernel):
        launched.append(kernel)
        return wrap(kernel)

    monkeypatch.setattr(torch.library, "wrap_triton", spy)
    x = _randn(7, 777, dtype=torch.float32)
    w, b = _randn(777, dtype=torch.float32), _randn(777, dtype=torch.float32)
    _check_layer_norm(x, [777], w, b)
    assert N._layer_norm_bwd_row_kernel in launched and N._layer_norm_bwd_kernel in launched


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_strided_input_and_eps(dtype):
    # a transposed input (row stride 1, column stride N), a large eps, a large offset (cancellation)
    x = _randn(40, 30, dtype=dtype, scale=0.5, offset=100.0).t()
    w, b = _randn(40, dtype=dtype), _randn(40, dtype=dtype)
    _check_layer_norm(x, [40], w, b, eps=0.1)


# ---- RMSNorm and residual add + norm ------------------------------------------------------------


def _add_norm_ref(rms, x, r, shape, w, b, grads, eps, dtype, upcast):
    """(out, residual_out, d input, d residual, dw, db) of norm(x + r) with h rounded to x's dtype,
    computed in ``dtype``; ``r`` None: the plain norm (then residual_out, d residual are None)."""
    leaves = [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in (x, r, w, b)]
    if r is None:
        h = leaves[0]
    else:  # h's value: x + r rounded to x's dtype (as stored); its gradient: 1 to both (s - s.detach() is 0)
        s = leaves[0] + leaves[1]
        h = (x + r).to(dtype) + (s - s.detach())
    if rms:
        y = reference.rms_norm(h, shape, leaves[2], eps, upcast=upcast)
    else:
        y = reference.layer_norm(h, shape, leaves[2], leaves[3], eps, upcast=upcast)
    outs, gs = [y], [grads[0].to(dtype)]
    if r is not None:
        outs.append(h)
        gs.append(grads[1].to(dtype))
    torch.autograd.backward(outs, gs)
    res = h.detach() if r is not None else None
    return y.detach(), res, *(t.grad if t is not None else None for t in leaves)


def _check_add_norm(rms, x, r, shape, w, b, eps=1e-5):
    g_out = _randn(*x.shape, dtype=x.dtype)
    g_res = _randn(*x.shape, dtype=x.dtype) if r is not None else None
    if r is None and rms:
        y, rstd = rms_norm_forward(x, shape, w, eps)
        dx, dw = rms_norm_backward(g_out, x, shape, rstd, w)
        ours = (y, None, dx, None, dw, None)
    elif rms:
        y, h, rstd = add_rms_norm_forward(x, r, shape, w, eps)
        dh, di, dw = add_rms_norm_backward(g_out, g_res, h, shape, rstd, w)
        assert di.numel() == 0  # no dropout: the input's gradient is the residual's
        ours = (y, h, dh, dh, dw, None)
    else:
        y, h, mean, rstd = add_layer_norm_forward(x, r, shape, w, b, eps)
        dh, di, dw, db = add_layer_norm_backward(g_out, g_res, h, shape, mean, rstd, w, b)
        assert di.numel() == 0
        ours = (y, h, dh, dh, dw, db)
    truth = _add_norm_ref(rms, x, r, shape, w, b, (g_out, g_res), eps, torch.float64, True)
    same = _add_norm_ref(rms, x, r, shape, w, b, (g_out, g_res), eps, x.dtype, False)
    if r is not None:
        assert torch.equal(ours[1], x + r)  # residual_out: x + r rounded to the dtype, as the composite
    names = ("out", "residual_out", "dinput", "dresidual", "dweight", "dbias")
    for name, o, sm, t, factor in zip(names, ours, same, truth, (2, 0, 3, 3, 3, 3)):
        if t is None or not factor:
            continue
        if o.numel() == 0 and t.numel() != 0:
            raise AssertionError(f"{name}: empty")
        assert o.dtype == x.dtype
        _check(name, o, sm, t, factor)


@interpreted
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,normalized_shape", LN_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["rms", "add_rms", "add_layer"])
def test_rms_and_add_norm_match_reference(dtype, shape, normalized_shape, kind):
    x = _randn(*shape, dtype=dtype, scale=2.0, offset=0.5)
    r = _randn(*shape, dtype=dtype) if kind.startswith("add") else None
    w = _randn(*normalized_shape, dtype=dtype)
    b = _randn(*normalized_shape, dtype=dtype) if kind == "add_layer" else None
    _check_add_norm(kind != "add_layer", x, r, list(normalized_shape), w, b)


@interpreted
@pytest.mark.parametrize("kind", ["rms", "add_rms"])
def test_rms_norm_without_weight(kind):
    x = _randn(9, 300, dtype=torch.float32)  # streamed: 300 > MAX_BLOCK_D
    r = _randn(9, 300, dtype=torch.float32) if kind == "add_rms" else None
    _check_add_norm(True, x, r, [300], None, None, eps=1e-3)


@interpreted
def test_add_norm_triton_rejects_dropout():
    x = _randn(4, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="dropout"):
        add_rms_norm_forward(x, x, [8], None, 1e-5, 0.1, 3)


@interpreted
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_rms_and_add_norm_agree_with_cpp(dtype):
    for op in ("rms_norm_fwd", "rms_norm_bwd", "add_layer_norm_fwd", "add_layer_norm_bwd", "add_rms_norm_fwd"):
        _require_cpu_kernel(op)
    x, r = _randn(5, 6, 97, dtype=dtype, offset=1.0), _randn(5, 6, 97, dtype=dtype)
    shape = [6, 97]
    w, b = _randn(6, 97, dtype=dtype), _randn(6, 97, dtype=dtype)
    g, g_res = _randn(5, 6, 97, dtype=dtype), _randn(5, 6, 97, dtype=dtype)
    ops = torch.ops.fusedformer
    ours, cpp = rms_norm_forward(x, shape, w, 1e-5), ops.rms_norm_fwd(x, shape, w, 1e-5)
    for name, a, c in zip(("out", "rstd"), ours, cpp):
        _assert_agree(f"rms {name}", a, c)
    grads, grads_c = rms_norm_backward(g, x, shape, ours[1], w), ops.rms_norm_bwd(g, x, shape, cpp[1], w)
    for name, a, c in zip(("dx", "dweight"), grads, grads_c):
        _assert_agree(f"rms {name}", a, c)
    ours, cpp = add_layer_norm_forward(x, r, shape, w, b, 1e-5), ops.add_layer_norm_fwd(x, r, shape, w, b, 1e-5)
    for name, a, c in zip(("out", "residual_out", "mean", "rstd"), ours, cpp):
        _assert_agree(f"add_layer {name}", a, c)
    grads = add_layer_norm_backward(g, g_res, ours[1], shape, ours[2], ours[3], w, b)
    grads_c = ops.add_layer_norm_bwd(g, g_res, cpp[1], shape, cpp[2], cpp[3], w, b)
    for name, a, c in zip(("dresidual", "dinput", "dweight", "dbias"), grads, grads_c):
        _assert_agree(f"add_layer {name}", a, c)


# ---- GELU ---------------------------------------------------------------------------------------


def _gelu_ref(x, b, approximate, grad, dtype, upcast):
    leaves = [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in (x, b)]
    y = reference.gelu(leaves[0], approximate, leaves[1], upcast=upcast)
    y.backward(grad.to(dtype))
    return y.detach(), *(t.grad if t is not None else None for t in leaves)


def _check_gelu(x, b, approximate, grad=None):
    grad = _randn(*x.shape, dtype=x.dtype, device=x.device) if grad is None else grad
    y = gelu_forward(x, b, approximate)
    dx, db = gelu_backward(grad, x, b, approximate)
    truth = _gelu_ref(x, b, approximate, grad, torch.float64, True)
    same = _gelu_ref(x, b, approximate, grad, x.dtype, False)
    for name, ours, s, t, factor in zip(("out", "dx", "dbias"), (y, dx, db), same, truth, (2, 3, 3)):
        if t is None:
            assert ours.shape == (0,), f"{name}: expected an empty tensor without a bias"
            continue
        assert ours.dtype == x.dtype and ours.is_contiguous()
        _check(name, ours, s, t, factor)
    return y, dx, db


GELU_SHAPES = [(1,), (17, 97), (3, 5, 333), (256, 64)]


@interpreted
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GELU_SHAPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_gelu_matches_reference(dtype, shape, approximate, with_bias):
    x = _randn(*shape, dtype=dtype, scale=3.0)  # reaches the tails of erf and tanh
    b = _randn(shape[-1], dtype=dtype) if with_bias else None
    _check_gelu(x, b, approximate)


@interpreted
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # x³ = inf, on purpose
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0·inf in a branch not taken
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_extreme_inputs(approximate):
    # far tails: gelu(x) -> x, gelu'(x) -> 1 for large x; both -> 0 for very negative x; no NaN but torch's
    x = torch.tensor([-1e4, -80.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 80.0, 1e4, 3e38, -3e38])
    y = gelu_forward(x, None, approximate)
    dx, _ = gelu_backward(torch.ones_like(x), x, None, approximate)
    assert torch.isfinite(y).all()
    assert torch.equal(y[-4:-1], x[-4:-1]) and (y[:3] == 0).all()
    assert (dx[-5:-2] == 1).all() and (dx[:2] == 0).all()
    # at ±3e38 the gradient is torch's: 1 and 0 for erf; NaN for tanh, whose x² overflows float32 (issue 11)
    huge = x[-2:].clone().requires_grad_()
    torch.nn.functional.gelu(huge, approximate=approximate).sum().backward()
    assert torch.equal(dx[-2:].isnan(), huge.grad.isnan()) and torch.equal(dx[-2:].nan_to_num(), huge.grad.nan_to_num())
    assert dx[-2:].isnan().all() == (approximate == "tanh")


@interpreted
def test_gelu_strided_input():
    x = _randn(64, 48, dtype=torch.float32, scale=3.0)[::2, 1::3]
    _check_gelu(x, _randn(x.shape[-1], dtype=torch.float32), "tanh")


# ---- the interpreter's bf16 trap ------------------------------------------------------------------


@interpreted
def test_round_to_rounds_to_nearest_even_like_torch():
    # round_to is what makes bf16 honest under the interpreter: it must round exactly as torch does
    import triton
    import triton.language as tl

    @triton.jit
    def _round_kernel(X, Y, N, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N)
        tl.store(Y + offs, _common.round_to(x, Y.dtype.element_ty, INTERP_BF16), mask=offs < N)

    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)])  # halfway: to even, away from odd
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, 1e-39, -7e-40, 2.0**-133])
    x = torch.cat([torch.randn(4000) * 10.0 ** torch.randint(-30, 30, (4000,)), ties, special])
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    grid = (triton.cdiv(x.numel(), 1024),)
    _round_kernel[grid](x, y, x.numel(), INTERP_BF16=_common.interp_bf16(torch.bfloat16), BLOCK=1024)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))  # bit for bit
    nan = torch.full((4,), float("nan"))
    y = torch.empty(4, dtype=torch.bfloat16)
    _round_kernel[(1,)](nan, y, 4, INTERP_BF16=True, BLOCK=4)
    assert y.isnan().all()


@interpreted
def test_widen_is_exact_for_every_bf16_value():
    # widen is how the kernels read bf16 (under the interpreter and on the GPU alike): every one of the
    # 65,536 bit patterns, subnormals, infinities and NaNs included, must come out as torch widens it
    import triton
    import triton.language as tl

    @triton.jit
    def _widen_kernel(X, Y, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, _common.widen(tl.load(X + offs)))

    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    y = torch.empty(x.shape, dtype=torch.float32)
    _widen_kernel[(x.numel() // 4096,)](x, y, BLOCK=4096)
    assert torch.equal(y.view(torch.int32), x.float().view(torch.int32))


# ---- agreement with the C++ CPU ops ---------------------------------------------------------------


def _has_cpu_kernel(op: str) -> bool:
    import fusedformer  # noqa: F401  (loads the extension, which registers the ops)

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedformer::{op}", "CPU")
    except RuntimeError:
        return False


def _require_cpu_kernel(op: str) -> None:
    # the C++ kernels are part of every build: a missing one is a failure, not a reason to skip
    assert _has_cpu_kernel(op), f"fusedformer::{op} has no C++ CPU kernel in this build"


# Each backend is held to the float64 reference on its own; here the two must agree to a few roundings
# of the dtype (atol and rtol): a different convention (mask polarity, scale, empty gradients, dead
# rows, statistics dtype) shows up far above these, a different summation order does not.
_AGREE_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _assert_agree(name, triton_result, cpp_result):
    assert triton_result.shape == cpp_result.shape, f"{name}: {triton_result.shape} != {cpp_result.shape}"
    assert triton_result.dtype == cpp_result.dtype, f"{name}: {triton_result.dtype} != {cpp_result.dtype}"
    tol = _AGREE_TOL.get(triton_result.dtype, 0.0)
    torch.testing.assert_close(triton_result, cpp_result, atol=tol, rtol=tol, equal_nan=False, msg=name)


@interpreted
@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
def test_attention_agrees_with_cpp(dtype):
    _require_cpu_kernel("attention_fwd")
    _require_cpu_kernel("attention_bwd")
    B, Hq, Hk, L, S = 2, 4, 2, 37, 45
    q, k, v = _qkv(B, Hq, Hk, L, S, 24, 16, dtype)
    mask = torch.rand(B, 1, L, S) > 0.2
    mask[0, 0, 3] = False  # a dead row
    grad = _randn(B, Hq, L, 16, dtype=dtype)
    ops = torch.ops.fusedformer
    for m in (None, mask, torch.where(mask, 0.0, float("-inf")).to(dtype)):
        out, lse = attention_forward(q, k, v, m, True, 0.3)
        out_c, lse_c = ops.attention_fwd(q, k, v, m, True, 0.3)
        _assert_agree("out", out, out_c)
        _assert_agree("logsumexp", lse, lse_c)
        grads = attention_backward(grad, q, k, v, out, lse, m, True, 0.3)
        grads_c = ops.attention_bwd(grad, q, k, v, out_c, lse_c, m, True, 0.3)
        for name, a, c in zip(("dq", "dk", "dv"), grads, grads_c):
            _assert_agree(name, a, c)


@interpreted
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_agrees_with_cpp(dtype, affine):
    _require_cpu_kernel("layer_norm_fwd")
    _require_cpu_kernel("layer_norm_bwd")
    x = _randn(5, 6, 97, dtype=dtype, offset=1.0)
    shape = [6, 97]
    w, b = (_randn(6, 97, dtype=dtype), _randn(6, 97, dtype=dtype)) if affine else (None, None)
    grad = _randn(5, 6, 97, dtype=dtype)
    ours = layer_norm_forward(x, shape, w, b, 1e-5)
    cpp = torch.ops.fusedformer.layer_norm_fwd(x, shape, w, b, 1e-5)
    for name, a, c in zip(("out", "mean", "rstd"), ours, cpp):
        _assert_agree(name, a, c)
    grads = layer_norm_backward(grad, x, shape, ours[1], ours[2], w, b)
    grads_c = torch.ops.fusedformer.layer_norm_bwd(grad, x, shape, cpp[1], cpp[2], w, b)
    for name, a, c in zip(("dx", "dweight", "dbias"), grads, grads_c):
        _assert_agree(name, a, c)


@interpreted
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_gelu_agrees_with_cpp(dtype, approximate, with_bias):
    _require_cpu_kernel("gelu_fwd")
    _require_cpu_kernel("gelu_bwd")
    x = _randn(13, 333, dtype=dtype, scale=3.0)
    b = _randn(333, dtype=dtype) if with_bias else None
    grad = _randn(13, 333, dtype=dtype)
    _assert_agree("out", gelu_forward(x, b, approximate), torch.ops.fusedformer.gelu_fwd(x, b, approximate))
    grads = gelu_backward(grad, x, b, approximate)
    grads_c = torch.ops.fusedformer.gelu_bwd(grad, x, b, approximate)
    for name, a, c in zip(("dx", "dbias"), grads, grads_c):
        _assert_agree(name, a, c)


# ---- attention dropout: the C++ kernels' mask ------------------------------------------------------


def _seed(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


@interpreted
@pytest.mark.parametrize("seed", [0x5EED_1234_ABCD, -3, 2**62 + 5])
def test_attention_dropout_drops_the_cpp_mask(seed):
    # with V = I (Ev = S) the output is P ∘ D itself: 0 exactly where the C++ mask drops (P > 0 elsewhere)
    B, H, L, S, p = 2, 3, 37, 29, 0.4
    q, k = _randn(B, H, L, 16, dtype=torch.float32), _randn(B, H, S, 16, dtype=torch.float32)
    v = torch.eye(S).expand(B, H, S, S)
    out, lse = attention_forward(q, k, v, None, False, 0.3, p, _seed(seed))
    keep = torch.ops.fusedformer.attention_dropout_mask(B, H, L, S, p, seed)
    assert torch.equal(out != 0, keep)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.3, -1)
    torch.testing.assert_close(out.double(), probs * keep / (1 - p), rtol=1e-5, atol=1e-7)
    assert torch.equal(lse, attention_forward(q, k, v, None, False, 0.3)[1])  # of the un-dropped P


@interpreted
def test_attention_dropout_statistics():
    B, H, L, S, p = 1, 2, 64, 64, 0.3
    q, k = _randn(B, H, L, 16, dtype=torch.float32, scale=0.1), _randn(B, H, S, 16, dtype=torch.float32)
    v = torch.eye(S).expand(B, H, S, S)
    out, _ = attention_forward(q, k, v, None, False, 1.0, p, _seed(11))
    out2, _ = attention_forward(q, k, v, None, False, 1.0, p, _seed(12))
    kept, kept2 = out != 0, out2 != 0
    n = kept.numel()  # 8192 draws: 1 - p within 4 standard deviations (0.02)
    assert abs(kept.double().mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    # kept ones are scaled by 1 / (1 - p): each row sums to 1 in expectation (std about 0.05 per row here)
    assert abs(out.double().sum(-1).mean().item() - 1.0) < 0.03
    # another seed, another mask: two independent masks agree on (1 - p)^2 + p^2 = 58% of the elements
    assert abs((kept == kept2).double().mean().item() - ((1 - p) ** 2 + p**2)) < 0.05


@interpreted
@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
def test_attention_dropout_agrees_with_cpp(dtype):
    _require_cpu_kernel("attention_fwd")
    B, Hq, Hk, L, S = 2, 4, 2, 37, 45
    q, k, v = _qkv(B, Hq, Hk, L, S, 24, 16, dtype)
    mask = torch.rand(B, 1, L, S) > 0.2
    grad = _randn(B, Hq, L, 16, dtype=dtype)
    seed, ops = _seed(987654321), torch.ops.fusedformer
    for m, causal in ((None, True), (mask, False), (torch.where(mask, 0.0, float("-inf")).to(dtype), True)):
        out, lse = attention_forward(q, k, v, m, causal, 0.3, 0.25, seed)
        out_c, lse_c = ops.attention_fwd(q, k, v, m, causal, 0.3, 0.25, seed)
        grads = attention_backward(grad, q, k, v, out, lse, m, causal, 0.3, 0.25, seed)
        grads_c = ops.attention_bwd(grad, q, k, v, out_c, lse_c, m, causal, 0.3, 0.25, seed)
        names = ("out", "logsumexp", "dq", "dk", "dv")
        for name, a, c in zip(names, (out, lse, *grads), (out_c, lse_c, *grads_c)):
            _assert_agree(name, a, c)
            if dtype == torch.float32:  # the same elements kept: equal to float32 rounding, not just close
                finite = torch.isfinite(c)  # a dead row's logsumexp is +inf in both (_assert_agree checks)
                scale = max(1.0, c[finite].abs().max().item())
                assert (a - c)[finite].abs().max().item() <= 1e-5 * scale, name


@interpreted
def test_attention_dropout_is_served_by_triton_as_on_the_cpu(monkeypatch):
    """The public function on the Triton backend: no fallback (strict), and under one torch.manual_seed
    the same seed, so the same kept elements, outputs and gradients as the cpp backend."""
    import fusedformer as ff
    from fusedformer import backends

    monkeypatch.setenv("FUSEDFORMER_STRICT", "1")
    q, k, v = _qkv(2, 4, 2, 19, 23, 16, 16, torch.float32)
    grad = _randn(2, 4, 19, 16, dtype=torch.float32)
    request = backends.Request("attention", q.device, q.dtype, 0.2)
    assert backends.TritonBackend().not_supported_reasons(request) == []

    def run(backend):
        monkeypatch.setenv("FUSEDFORMER_BACKEND", backend)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(3)
        out = ff.scaled_dot_product_attention(*leaves, dropout_p=0.2, is_causal=True, enable_gqa=True)
        out.backward(grad)
        return [out.detach()] + [t.grad for t in leaves]

    on_triton, on_cpp = run("triton"), run("cpp")
    for a, c in zip(on_triton, on_cpp):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@interpreted
def test_torch_compile_fullgraph_dropout_on_triton(monkeypatch):
    import fusedformer as ff

    monkeypatch.setenv("FUSEDFORMER_BACKEND", "triton")
    q, k, v = _qkv(1, 2, 2, 20, 20, 16, 16, torch.float32)

    def fn(q, k, v):
        return ff.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True).sin().sum()

    check_compiled_dropout(fn, (q, k, v))


# ---- launch limits, autotuning, precision ---------------------------------------------------------


@interpreted
def test_attention_grid_folds_batch_heads_past_65535(monkeypatch):
    """B·H = 70,000 at L = S = 1: every launch is a 1-D grid of 70,000 programs (CUDA caps grid axes y
    and z at 65,535). The launches are recorded, not run: the interpreter takes ~30 ms a program."""
    from fusedformer.kernels import attention as A

    launches = []

    class Record:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid))

    monkeypatch.setattr(torch.library, "wrap_triton", Record)
    q = torch.randn(7000, 10, 1, 16)
    out, lse = A.attention_forward(q, q, q, None, False, 0.25, 0.1, _seed(1))
    A.attention_backward(q, q, q, q, out, lse, None, False, 0.25, 0.1, _seed(1))
    assert [kernel for kernel, _ in launches] == [
        A._attn_fwd_kernel, A._attn_bwd_preprocess_kernel, A._attn_bwd_dkdv_kernel, A._attn_bwd_dq_kernel
    ]
    for kernel, grid in launches:
        for block in (16, 64, 128):
            shape = grid({"BLOCK_M": block, "BLOCK_N": block}) if callable(grid) else grid
            assert shape == (70_000,), (kernel, shape)
    with pytest.raises(ValueError, match="split the batch"):
        _common.flat_grid(2**20, 2**12, "test")


def test_length_bucket():
    assert [_common.length_bucket(n) for n in (0, 1, 16, 17, 32, 33, 1000, 1024, 1025)] == [
        16, 16, 16, 32, 32, 64, 1024, 1024, 2048
    ]


@interpreted
def test_attention_autotunes_once_per_length_bucket(monkeypatch):
    """Two configs and a stub benchmark: lengths 17 and 30 share a bucket (one tuning), 33 starts another."""
    import triton

    from fusedformer.kernels import attention as A

    kernel = A._attn_fwd_kernel
    assert "L" not in kernel.keys and "S" not in kernel.keys and {"L_BUCKET", "S_BUCKET"} <= set(kernel.keys)
    tuned = []

    def bench(*args, config, **kwargs):
        tuned.append(kernel.nargs["L"])
        return [1.0 + config.kwargs["BLOCK_M"], 0.0, 0.0]

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": 16}, num_warps=4, num_stages=1) for bm in (16, 32)]
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", bench)
    for L in (17, 30, 33):
        q = _randn(1, 1, L, 16, dtype=torch.float32)
        attention_forward(q, q, q, None, False, 0.25)
    assert tuned == [17, 17, 33, 33]  # both configs, once per bucket
    assert len(kernel.cache) == 2


def test_attention_prune_respects_shared_memory(monkeypatch):
    from fusedformer.kernels import attention as A

    q = torch.empty(1, 1, 1, 256, dtype=torch.float32)
    args = {"Q": q}
    # the compiled mode's config lists (the interpreter has one config per kernel)
    lists = (("fwd", A._fwd_configs(False)), ("dkdv", A._dkdv_configs(False)), ("dq", A._dq_configs(False)))
    for kind, configs in lists:
        monkeypatch.setattr(A, "max_shared_memory", lambda device: None)
        everything = A._pruner(kind)(configs, args, BLOCK_D=64, BLOCK_DV=64)
        monkeypatch.setattr(A, "max_shared_memory", lambda device: 64 * 1024)
        kept = A._pruner(kind)(configs, args, BLOCK_D=64, BLOCK_DV=64)
        assert kept and all(A._smem_bytes(kind, c, 64, 64, 4) <= 64 * 1024 for c in kept), kind
        assert len(kept) < len(everything), kind
        # nothing fits: the smallest estimate is kept, so that the launch still has a config
        monkeypatch.setattr(A, "max_shared_memory", lambda device: 1024)
        (smallest,) = A._pruner(kind)(configs, args, BLOCK_D=64, BLOCK_DV=64)
        assert A._smem_bytes(kind, smallest, 64, 64, 4) == min(
            A._smem_bytes(kind, c, 64, 64, 4) for c in configs
        )


@pytest.fixture
def allow_tf32():
    """Sets torch.backends.cuda.matmul.allow_tf32 (a property of torch's, which monkeypatch cannot undo)."""
    before = torch.backends.cuda.matmul.allow_tf32

    def set_(value: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_
    torch.backends.cuda.matmul.allow_tf32 = before


def test_dot_precision_follows_torch_tf32(allow_tf32):
    allow_tf32(False)
    assert _common.dot_precision(torch.float32) == "ieee"
    allow_tf32(True)
    assert _common.dot_precision(torch.float32) == "tf32"
    assert _common.dot_precision(torch.bfloat16) == "ieee" and _common.dot_precision(torch.float16) == "ieee"


@interpreted
def test_attention_runs_with_tf32_allowed(allow_tf32, monkeypatch):
    # the interpreter sums full float32 products whatever the precision (no TF32 rounding to see): this
    # checks that the "tf32" flag reaches every launch's dots and the kernels still compute attention
    from fusedformer.kernels import attention as A

    precisions = []
    wrap = torch.library.wrap_triton

    class Spy:
        def __init__(self, kernel):
            self.launcher = wrap(kernel)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                precisions.append(kwargs["PRECISION"])
                return self.launcher[grid](*args, **kwargs)

            return launch

    allow_tf32(True)
    monkeypatch.setattr(torch.library, "wrap_triton", Spy)
    q, k, v = _qkv(1, 2, 2, 17, 19, 16, 16, torch.float32)
    _check_attention(q, k, v, mask=None, is_causal=True)
    assert precisions == ["tf32"] * 4
    assert A.dot_precision is _common.dot_precision


# ---- the compiled (GPU) code path -----------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import warnings
    warnings.filterwarnings("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedformer.kernels import _common, attention as A, gelu as G, layer_norm as N

    def compile_(kernel, pointers, constexprs):
        while not isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel = kernel.fn
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name] = "*" + pointers[name]
            elif name in ("eps_hi", "eps_lo", "scale", "qk_scale", "drop_scale"):
                sig[name] = "fp32"
            else:
                sig[name] = "i64" if name == "drop_threshold" else "i32"
        binary = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 80, 32))
        assert binary.asm["cubin"], kernel.__name__

    cu = dict(CuQ="i32", CuK="i32")
    # the padded kernels (VARLEN off, masks on) with and without dropout, in each dtype (fp32 with TF32),
    # and their packed-sequence variant (VARLEN on, no mask, no dropout)
    for dt, precision, dropout, varlen in (
        ("bf16", "ieee", True, False), ("fp16", "ieee", True, False), ("fp32", "tf32", True, False),
        ("bf16", "ieee", False, False), ("bf16", "ieee", False, True),
    ):
        heads = dict(INTERP_BF16=False, PRECISION=precision, BLOCK_D=64, BLOCK_DV=32)
        masks = dict(HAS_MASK=not varlen, MASK_IS_BOOL=False, IS_CAUSAL=True, DROPOUT=dropout, VARLEN=varlen)
        renorm = not varlen
        compile_(A._attn_fwd_kernel, dict(cu, Q=dt, K=dt, V=dt, Mask=dt, Out=dt, Lse="fp32", Seed="i64"),
                 dict(heads, **masks, BLOCK_M=64, BLOCK_N=32))
        compile_(A._attn_bwd_preprocess_kernel,
                 dict(cu, O=dt, DO=dt, Delta="fp32", Renorm="fp32", Q=dt, K=dt, Mask=dt, Lse="fp32"),
                 dict(heads, RENORM=renorm, IS_CAUSAL=True, VARLEN=varlen, BLOCK_M=64, BLOCK_N=64))
        bwd = dict(cu, Q=dt, K=dt, V=dt, Mask=dt, DO=dt, Lse="fp32", Delta="fp32", Renorm="fp32", Seed="i64")
        compile_(A._attn_bwd_dkdv_kernel, dict(bwd, DK=dt, DV=dt),
                 dict(heads, **masks, RENORM=renorm, BLOCK_M=32, BLOCK_N=64))
        compile_(A._attn_bwd_dq_kernel, dict(bwd, DQ=dt),
                 dict(heads, **masks, RENORM=renorm, BLOCK_M=64, BLOCK_N=32))
    bf = "bf16"
    # LayerNorm, and residual add + RMSNorm; the backward's wide-row pair (row kernel, then the column
    # chunks) and its one-chunk kernel, with and without the affine parameters
    for single in (True, False):
        for add, rms in ((False, False), (True, True)):
            ln = dict(HAS_WEIGHT=True, HAS_BIAS=not rms, HAS_RESIDUAL=add, IS_RMS=rms, INTERP_BF16=False,
                      SINGLE_BLOCK=single, BLOCK_D=1024, ROWS=2)
            compile_(N._layer_norm_fwd_kernel, dict(X=bf, R=bf, W=bf, B=bf, Y=bf, H=bf, Mean="fp32",
                     Rstd="fp32"), ln)
    grads = dict(DY=bf, X=bf, W=bf, Mean="fp32", Rstd="fp32", C1="fp32", C2="fp32", DRES=bf, DX=bf,
                 DWPartial="fp32", DBPartial="fp32")
    for affine, dres, rms in ((True, False, False), (False, False, False), (True, True, True)):
        for single in (True, False):
            ln = dict(HAS_WEIGHT=affine, HAS_BIAS=affine and not rms, HAS_DRES=dres, IS_RMS=rms,
                      INTERP_BF16=False, SINGLE_BLOCK=single, BLOCK_D=1024, ROWS=2)
            compile_(N._layer_norm_bwd_kernel, grads, ln)
        compile_(N._layer_norm_bwd_row_kernel, grads, dict(HAS_WEIGHT=affine, IS_RMS=rms, BLOCK_D=1024, ROWS=2))
    for tanh in (False, True):
        gl = dict(HAS_BIAS=True, APPROX_TANH=tanh, INTERP_BF16=False, BLOCK_C=256, BLOCK_R=4)
        compile_(G._gelu_fwd_kernel, dict(X=bf, Bias=bf, Y=bf), gl)
        compile_(G._gelu_bwd_kernel, dict(DY=bf, X=bf, Bias=bf, DX=bf, DBiasPartial="fp32"), gl)
    compile_(_common._sum_rows_kernel, dict(Partial="fp32", Out=bf),
             dict(INTERP_BF16=False, BLOCK_G=8, BLOCK_C=256))
    print("compiled")
    """
)


_TRACE_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx
    from fusedformer.kernels.attention import attention_backward, attention_forward
    from fusedformer.kernels.gelu import gelu_backward, gelu_forward
    from fusedformer.kernels.layer_norm import (
        add_layer_norm_backward, add_layer_norm_forward, add_rms_norm_backward, add_rms_norm_forward,
        layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward,
    )

    x, b = torch.randn(4, 33), torch.randn(33)
    q, m = torch.randn(1, 2, 17, 16), torch.randn(17, 17)
    def gelu(x, b):
        return gelu_forward(x, b, "tanh"), gelu_backward(x, x, b, "tanh")

    def layer_norm(x, b):
        mean = rstd = x[:, 0]
        return layer_norm_forward(x, [33], b, b, 1e-5), layer_norm_backward(x, x, [33], mean, rstd, b, b)

    def rms_norm(x, b):
        rstd = x[:, 0]
        return rms_norm_forward(x, [33], b, 1e-5), rms_norm_backward(x, x, [33], rstd, b)

    def add_norms(x, b):
        mean = rstd = x[:, 0]
        return (add_layer_norm_forward(x, x, [33], b, b, 1e-5), add_rms_norm_forward(x, x, [33], b, 1e-5),
                add_layer_norm_backward(x, x, x, [33], mean, rstd, b, b),
                add_rms_norm_backward(x, None, x, [33], rstd, b))

    def attention(q, m):
        lse = q[..., 0]
        fwd = attention_forward(q, q, q, m, True, 0.25)
        return fwd, attention_backward(q, q, q, q, q, lse, m, True, 0.25)

    def attention_dropout(q, m):
        lse, seed = q[..., 0], torch.tensor(5)
        fwd = attention_forward(q, q, q, m, True, 0.25, 0.1, seed)
        return fwd, attention_backward(q, q, q, q, q, lse, m, True, 0.25, 0.1, seed)

    for fn, args, launches in ((gelu, (x, b), 3), (layer_norm, (x, b), 4), (rms_norm, (x, b), 3),
                               (add_norms, (x, b), 7), (attention, (q, m), 4), (attention_dropout, (q, m), 4)):
        graph = make_fx(fn, tracing_mode="fake")(*args).graph
        found = [n for n in graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        assert len(found) == launches, (fn.__name__, len(found))
    print("traced")
    """
)


def test_launchers_trace_with_fake_tensors():
    """What a torch.library.triton_op registration needs: traced with fake tensors (as torch.compile does),
    every launcher records its kernels as wrap_triton nodes and touches no data. Compiled-kernel mode
    only: under the interpreter wrap_triton runs the kernel instead of recording it."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "traced" in proc.stdout, proc.stderr[-4000:]


def test_kernels_compile_for_gpu():
    """The interpreter runs Python, not GPU code: compile the kernels as a GPU takes them (INTERP_BF16
    off: bf16 tensor-core dots; dropout on; fp32 attention with TF32) to sm_80 binaries with Triton's own
    compiler and ptxas."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


# ---- on a GPU -----------------------------------------------------------------------------------

GPU_ATTN_SHAPES = ATTN_SHAPES + [(1025, 1025, 96, 96), (113, 1025, 111, 40), (256, 256, 256, 256)]
GPU_LN_SHAPES = LN_SHAPES + [((64, 8192), (8192,)), ((3, 20000), (20000,))]


@on_gpu
@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L,S,E,Ev", GPU_ATTN_SHAPES)
def test_attention_on_gpu(dtype, is_causal, L, S, E, Ev):
    for kind in (None, "bool", "float", "key_padding"):
        mask = _mask(kind, 2, 4, L, S, dtype).cuda() if kind else None
        _check_attention(*_qkv(2, 4, 2, L, S, E, Ev, dtype, device="cuda"), mask=mask, is_causal=is_causal)


@on_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,normalized_shape", GPU_LN_SHAPES, ids=str)
def test_layer_norm_on_gpu(dtype, shape, normalized_shape):
    x = _randn(*shape, dtype=dtype, device="cuda", scale=2.0, offset=0.5)
    for affine in (True, False):
        w = _randn(*normalized_shape, dtype=dtype, device="cuda") if affine else None
        b = _randn(*normalized_shape, dtype=dtype, device="cuda") if affine else None
        _check_layer_norm(x, list(normalized_shape), w, b)


@on_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GELU_SHAPES + [(4096, 4096)], ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_on_gpu(dtype, shape, approximate):
    x = _randn(*shape, dtype=dtype, device="cuda", scale=3.0)
    for b in (_randn(shape[-1], dtype=dtype, device="cuda"), None):
        _check_gelu(x, b, approximate)
