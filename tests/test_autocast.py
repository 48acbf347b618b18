"""Under ``torch.autocast`` (CPU, bfloat16 and float16) the ops torch autocasts (linear, scaled dot-product
attention) take autocast's casts: the same output dtype as torch's, gradients in the leaves' dtype, and the
house rule against float64 with torch's autocast result as the yardstick."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fusedformer as ff
import fusedformer.nn.linear as fflinear
from fusedformer import handover
from tests.conftest import assert_error_within, randn

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _run(fn, leaves, grad, autocast_dtype):
    """fn(*leaves) under a CPU autocast of ``autocast_dtype`` (None: off), backward with ``grad``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_linear_under_autocast(dtype):
    x, w, b = randn(97, 130), randn(65, 130, scale=130**-0.5), randn(65)
    grad = randn(97, 65)
    ours, ours_grads = _run(ff.linear, (x, w, b), grad, dtype)
    torchs, torch_grads = _run(F.linear, (x, w, b), grad, dtype)
    truth, truth_grads = _run(F.linear, (x.double(), w.double(), b.double()), grad.double(), None)
    assert ours.dtype == torchs.dtype == dtype
    assert all(g.dtype == torch.float32 for g in ours_grads)
    if dtype == torch.bfloat16:  # torch's own bfloat16 linear serves: the very same numbers
        assert torch.equal(ours, torchs)
    assert_error_within("out", ours, torchs, truth, 2)
    for name, o, t, d in zip(("dx", "dw", "db"), ours_grads, torch_grads, truth_grads):
        assert_error_within(name, o, t, d, 3)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_attention_under_autocast(dtype, is_causal):
    q, k, v = randn(2, 4, 97, 32), randn(2, 4, 130, 32), randn(2, 4, 130, 32)
    grad = randn(2, 4, 97, 32)

    def sdpa(fn):
        return lambda q, k, v: fn(q, k, v, is_causal=is_causal)

    ours, ours_grads = _run(sdpa(ff.scaled_dot_product_attention), (q, k, v), grad, dtype)
    torchs, torch_grads = _run(sdpa(F.scaled_dot_product_attention), (q, k, v), grad, dtype)
    truth, truth_grads = _run(sdpa(F.scaled_dot_product_attention), (q.double(), k.double(), v.double()),
                              grad.double(), None)  # fmt: skip
    assert ours.dtype == torchs.dtype == dtype
    assert all(g.dtype == torch.float32 for g in ours_grads)
    assert_error_within("out", ours, torchs, truth, 2)
    for name, o, t, d in zip(("dq", "dk", "dv"), ours_grads, torch_grads, truth_grads):
        assert_error_within(name, o, t, d, 3)


def test_float_mask_is_cast_and_float64_left():
    """A float mask is cast with the inputs (as torch's autocast casts every floating argument); float64
    inputs are left in float64, as autocast leaves them."""
    q = randn(1, 2, 17, 16)
    mask = randn(1, 1, 17, 17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ff.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        ref = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        out64 = ff.scaled_dot_product_attention(q.double(), q.double(), q.double())
    assert out.dtype == ref.dtype == torch.bfloat16 and out64.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.02)


def test_linear_module_defers_to_autocast(monkeypatch):
    """ff.nn.Linear under autocast runs F.linear (autocast's casts and engine), remembered apart from the
    same call without autocast; explain says so."""
    monkeypatch.delenv("FUSEDFORMER_HANDOVER", raising=False)
    fflinear.reset()
    m = fflinear.Linear(32, 16)
    x = randn(70, 32)
    with handover.off():
        plain = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = m(x)
            assert "autocast" in m.explain(x)
    assert plain.dtype == torch.float32 and cast.dtype == torch.bfloat16
    assert torch.equal(cast, F.linear(x.bfloat16(), m.weight.bfloat16(), m.bias.bfloat16()))
    assert len(m.__dict__["_ff_linear"]) == 2
    fflinear.reset()


def test_patched_layer_under_autocast_matches_torch():
    """A patched nn.TransformerEncoderLayer (dropout 0, grad on) under a bfloat16 autocast: torch's output dtype
    (float32: its LayerNorms take the float32 residual sums), and within the rule against the float64 layer,
    with torch's autocast result as the yardstick.

    (In eval under no_grad torch takes its fused "fast path", which returns bfloat16 under a CPU autocast;
    the patched layer keeps the dtypes of the path above.)"""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, 0.0, batch_first=True)
    fused, wide = copy.deepcopy(layer), copy.deepcopy(layer).double()
    ff.patch(fused)
    x = randn(2, 33, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, torchs = fused(x), layer(x)
    truth = wide(x.double())
    assert ours.dtype == torchs.dtype == torch.float32
    assert_error_within("out", ours.detach(), torchs.detach(), truth.detach(), 2)
