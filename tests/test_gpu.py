"""On a CUDA GPU, the kernels compiled (not interpreted): what test_triton.py's ``@on_gpu`` tests leave out.
Packed sequences (varlen) forward and backward, the KV-cache and decode kernels, attention dropout (the kept
elements recovered and the outputs and gradients held to the float64 reference with that mask), memory
that stays O(L) in training with dropout, and opcheck with the fake-tensor and AOT checks that the
interpreter cannot run. Marked ``gpu``: ``make gpu-check`` runs them; skipped on machines without a GPU.

The rule as everywhere: error against float64 <= 2x (outputs) or 3x (gradients) the same-dtype reference's."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import fusedformer as ff  # noqa: E402
from fusedformer import reference  # noqa: E402
from fusedformer.kernels import _common  # noqa: E402
from fusedformer.kernels.attention import attention_backward, attention_forward  # noqa: E402
from tests.conftest import assert_error_within  # noqa: E402
from tests.test_varlen import _cu as cu_seqlens, _ref  # noqa: E402  (the per-sequence float64 reference)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU available (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(_common.INTERPRET, reason="kernels interpreted in this session; run with TRITON_INTERPRET=0"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA = "cuda"


def _randn(*shape, dtype, scale=1.0):
    """Made in float64 on the CPU (reproducible from the test's seed), rounded once, then moved."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=CUDA, dtype=dtype)


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "triton")
    monkeypatch.setenv("FUSEDFORMER_STRICT", "1")


# ---- varlen ----------------------------------------------------------------------------------------

LENGTHS = {
    "self": ([1, 17, 0, 97, 33], [1, 17, 0, 97, 33]),
    "cross": ([5, 17, 1], [97, 3, 40]),
    "no_keys": ([4, 9, 3], [0, 12, 5]),
    "long": ([3, 1025, 300, 2], [3, 1025, 300, 2]),
}


def _cu(lengths):
    return cu_seqlens(lengths).to(CUDA)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(LENGTHS))
def test_varlen_on_gpu(dtype, is_causal, case):
    lq, lk = LENGTHS[case]
    Hq, Hk, E, Ev = 4, 2, 59, 48
    q, k, v = _randn(sum(lq), Hq, E, dtype=dtype), _randn(sum(lk), Hk, E, dtype=dtype), _randn(sum(lk), Hk, Ev, dtype=dtype)
    cu_q, cu_k = _cu(lq), _cu(lk)
    grad = _randn(sum(lq), Hq, Ev, dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    assert ff.explain(ff.varlen_attention, *leaves, cu_q, cu_k, max(lq), max(lk)).backend == "triton"
    out = ff.varlen_attention(*leaves, cu_q, cu_k, max(lq), max(lk), is_causal=is_causal)
    out.backward(grad)
    ours = (out.detach(), *(t.grad for t in leaves))
    scale = 1.0 / math.sqrt(E)
    truth = _ref(q, k, v, cu_q, cu_k, grad, is_causal, scale, torch.float64, True)
    same = _ref(q, k, v, cu_q, cu_k, grad, is_causal, scale, dtype, False)
    for name, o, s, t, factor in zip(("out", "dq", "dk", "dv"), ours, same, truth, (2, 3, 3, 3)):
        assert o.dtype == dtype and o.device.type == CUDA
        assert_error_within(name, o, s, t, factor)


# ---- decode and the KV cache ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 12, 12, 1, 4096, 64), (2, 32, 8, 1, 1025, 128), (3, 8, 2, 3, 777, 80)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_decode_sdpa_on_gpu(dtype, shape, is_causal):
    B, Hq, Hk, L, S, E = shape
    q, k, v = _randn(B, Hq, L, E, dtype=dtype), _randn(B, Hk, S, E, dtype=dtype), _randn(B, Hk, S, E, dtype=dtype)
    kw = dict(is_causal=is_causal, enable_gqa=True)
    assert ff.explain(ff.scaled_dot_product_attention, q, k, v, **kw).backend == "triton"
    out = ff.scaled_dot_product_attention(q, k, v, **kw)
    truth = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    same = reference.scaled_dot_product_attention(q, k, v, upcast=False, **kw)
    assert_error_within("out", out, same, truth, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_cache_on_gpu(dtype):
    """Appended in place at each sequence's length, ragged lengths, GQA, bottom-right causal; a decode
    step and a chunked step; an overflow raises before anything is written."""
    B, Hq, Hk, S_max, E = 3, 8, 2, 2048, 64
    for L, before in ((1, [0, 17, 2047]), (7, [0, 1000, 2041])):
        q = _randn(B, Hq, L, E, dtype=dtype)
        kc, vc = _randn(B, Hk, S_max, E, dtype=dtype), _randn(B, Hk, S_max, E, dtype=dtype)
        k, v = _randn(B, Hk, L, E, dtype=dtype), _randn(B, Hk, L, E, dtype=dtype)
        lens = torch.tensor(before, dtype=torch.int32, device=CUDA)
        assert ff.explain(ff.attention_with_kv_cache, q, kc, vc, k, v, cache_seqlens=lens).backend == "triton"
        kc64, vc64 = kc.double(), vc.double()
        truth = reference.attention_with_kv_cache(q.double(), kc64, vc64, k.double(), v.double(), lens)
        same = reference.attention_with_kv_cache(q, kc.clone(), vc.clone(), k, v, lens, upcast=False)
        out = ff.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens)
        assert_error_within(f"out L={L}", out, same, truth, 2)
        assert torch.equal(kc.double(), kc64) and torch.equal(vc.double(), vc64)  # the appended entries too
    kc0 = kc.clone()
    with pytest.raises(ValueError, match="overflows"):
        ff.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=torch.tensor([0, 0, 2042], device=CUDA))
    assert torch.equal(kc, kc0)


# ---- attention dropout --------------------------------------------------------------------------


def _seed(value):
    return torch.tensor(value, dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_attention_dropout_on_gpu(dtype, is_causal):
    """With V = I the output is P∘D/(1-p): the kept elements for this seed. Then random V under the same
    seed: output and every gradient against the float64 reference that applies that mask."""
    B, Hq, Hk, L, S, E, p = 2, 4, 2, 97, 113, 64, 0.25
    scale, seed = 1 / math.sqrt(E), _seed(0x5EED_0123)
    q, k = _randn(B, Hq, L, E, dtype=dtype), _randn(B, Hk, S, E, dtype=dtype)
    eye = torch.eye(S, device=CUDA, dtype=dtype).expand(B, Hk, S, S)
    probe, _ = attention_forward(q, k, eye, None, is_causal, scale, p, seed)
    causal = reference.causal_mask(L, S, device=CUDA) if is_causal else torch.ones(L, S, dtype=torch.bool, device=CUDA)
    keep = (probe != 0) | ~causal  # masked-out elements count as kept (their probability is 0 anyway)
    kept = keep[..., causal].double().mean().item()
    n = int(causal.sum()) * B * Hq
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"kept fraction {kept:.4f}, want {1 - p}"
    probe2, _ = attention_forward(q, k, eye, None, is_causal, scale, p, _seed(0x5EED_0124))
    assert not torch.equal(probe != 0, probe2 != 0), "another seed, the same mask"

    v = _randn(B, Hk, S, E, dtype=dtype)
    grad = _randn(B, Hq, L, E, dtype=dtype)
    out, lse = attention_forward(q, k, v, None, is_causal, scale, p, seed)
    grads = attention_backward(grad, q, k, v, out, lse, None, is_causal, scale, p, seed)

    def ref(dt, upcast):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        o = reference.scaled_dot_product_attention(*leaves, None, p, is_causal, scale, enable_gqa=True, upcast=upcast,
                                                   dropout_mask=keep)  # fmt: skip
        o.backward(grad.to(dt))
        return (o.detach(), *(t.grad for t in leaves))

    truth, same = ref(torch.float64, True), ref(dtype, False)
    for name, o, s, t, factor in zip(("out", "dq", "dk", "dv"), (out, *grads), same, truth, (2, 3, 3, 3)):
        assert_error_within(name, o, s, t, factor)


def test_training_with_dropout_stays_linear_in_memory_on_gpu():
    """fwd+bwd with dropout at L=8192 through the public function: the peak beyond inputs, outputs and
    gradients stays far below one head's L x L score matrix (128 MiB in fp16), and the step is reproducible
    under torch.manual_seed."""
    B, H, L, E = 1, 8, 8192, 64
    q, k, v = (_randn(B, H, L, E, dtype=torch.float16).requires_grad_(True) for _ in range(3))
    grad = _randn(B, H, L, E, dtype=torch.float16)

    def step(seed):
        for t in (q, k, v):
            t.grad = None
        torch.manual_seed(seed)
        out = ff.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)
        out.backward(grad)
        return out.detach(), [t.grad.clone() for t in (q, k, v)]

    step(1)  # compile and autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, grads = step(1)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    tensor = q.numel() * q.element_size()  # 8 MiB
    assert extra < 16 * tensor, f"{extra / 2**20:.0f} MiB beyond the inputs (one head's L x L: 128 MiB)"
    out2, grads2 = step(1)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    out3, _ = step(2)
    assert not torch.equal(out, out3)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_opcheck_on_gpu(dropout_p):
    """The Triton attention ops with every opcheck utility (fake tensors, AOT dispatch), a mask and GQA."""
    ops = torch.ops.fusedformer
    q, k, v = (_randn(2, h, 37, 32, dtype=torch.float16).requires_grad_(True) for h in (4, 2, 2))
    mask = torch.rand(2, 1, 37, 37, device=CUDA) > 0.2
    seed = _seed(77)
    args = (q, k, v, mask, True, 0.2, dropout_p, seed)
    torch.library.opcheck(ops.triton_attention_fwd, args)
    out, lse = ops.triton_attention_fwd(*args)
    go = torch.randn_like(out)
    torch.library.opcheck(ops.triton_attention_bwd,
                          (go, q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, True, 0.2, dropout_p, seed))


def test_compiled_module_step_on_gpu():
    """torch.compile(fullgraph) of a training step through ff.scaled_dot_product_attention with dropout on
    the GPU: reproducible under a seed, finite nonzero gradients."""
    from tests.conftest import check_compiled_dropout

    q, k, v = (_randn(2, 4, 64, 32, dtype=torch.bfloat16) for _ in range(3))

    def fn(q, k, v):
        return ff.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True).float().square().sum()

    check_compiled_dropout(fn, (q, k, v))


def test_varlen_opcheck_on_gpu():
    """The fake-tensor and AOT-dispatch checks too (the interpreter cannot run them on CPU)."""
    lq, lk = [5, 0, 17], [9, 3, 17]
    q, k, v = (_randn(sum(n), h, e, dtype=torch.float32).requires_grad_(True)
               for n, h, e in ((lq, 4, 16), (lk, 2, 16), (lk, 2, 8)))  # fmt: skip
    ops = torch.ops.fusedformer
    args = (q, k, v, _cu(lq), _cu(lk), 17, 17, True, 0.3)
    torch.library.opcheck(ops.triton_varlen_attention_fwd, args)
    out, lse = ops.triton_varlen_attention_fwd(*args)
    go = torch.randn_like(out)
    torch.library.opcheck(ops.triton_varlen_attention_bwd,
                          (go, q.detach(), k.detach(), v.detach(), out.detach(), lse, *args[3:]))  # fmt: skip
