"""ff.varlen_attention: packed sequences against a per-sequence float64 reference, on the cpp backend and
on the Triton kernels under the interpreter (TRITON_INTERPRET=1, set in conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch

import fusedformer as ff
from fusedformer import backends, reference
from fusedformer.ops.attention import attention_dropout_mask, attention_fwd
from fusedformer.ops.varlen import varlen_attention_bwd, varlen_attention_fwd
from tests.conftest import assert_error_within, randn

BACKENDS = ["cpp"] + (["triton"] if backends.TRITON_KERNELS else [])
DTYPES = {"cpp": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
          "triton": [torch.float32, torch.bfloat16, torch.float16]}  # fmt: skip

# (query lengths, key lengths): ragged, with empty sequences, 1, 17, 97; cross-attention both ways; a
# sequence with queries and no keys; one sequence far longer than the rest (the CPU backward then
# splits it over the threads)
LENGTHS = {
    "self": ([1, 17, 0, 97, 33], [1, 17, 0, 97, 33]),
    "cross": ([5, 17, 1], [97, 3, 40]),
    "no_keys": ([4, 9, 3], [0, 12, 5]),
    "one_long": ([3, 257, 2], [3, 257, 2]),
}


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def _packed(lq, lk, Hq, Hk, E, Ev, dtype):
    q = randn(sum(lq), Hq, E, dtype=dtype)
    k = randn(sum(lk), Hk, E, dtype=dtype)
    v = randn(sum(lk), Hk, Ev, dtype=dtype)
    return q, k, v, _cu(lq), _cu(lk)


def _ref(q, k, v, cu_q, cu_k, grad, is_causal, scale, dtype, upcast, dropout_p=0.0, dropout_mask=None):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = reference.varlen_attention(*leaves, cu_q, cu_k, dropout_p, is_causal, scale, upcast=upcast,
                                     dropout_mask=dropout_mask)  # fmt: skip
    out.backward(grad.to(dtype))
    return (out.detach(), *(t.grad for t in leaves))


def _run(backend, monkeypatch, q, k, v, cu_q, cu_k, lq, lk, grad, **kw):
    monkeypatch.setenv("FUSEDFORMER_BACKEND", backend)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = ff.varlen_attention(*leaves, cu_q, cu_k, max(lq), max(lk), **kw)
    out.backward(grad)
    return (out.detach(), *(t.grad for t in leaves))


def _check_all(ours, q, k, v, cu_q, cu_k, grad, is_causal, scale):
    truth = _ref(q, k, v, cu_q, cu_k, grad, is_causal, scale, torch.float64, True)
    same = _ref(q, k, v, cu_q, cu_k, grad, is_causal, scale, q.dtype, False)
    for name, o, s, t, factor in zip(("out", "dq", "dk", "dv"), ours, same, truth, (2, 3, 3, 3)):
        assert o.dtype == q.dtype
        assert_error_within(name, o, s, t, factor)


# (backend, dtype, case) run: each backend in the dtypes it takes (Triton refuses float64: an error, tested
# below); the long case on the Triton kernels in float32 only, for the interpreter's time (in bf16 and fp16
# the compiled kernels run a 1025-token case on a GPU: tests/test_gpu.py::test_varlen_on_gpu)
REFERENCE_CASES = [
    (backend, dtype, case)
    for backend in BACKENDS
    for dtype in DTYPES[backend]
    for case in LENGTHS
    if not (backend == "triton" and case == "one_long" and dtype != torch.float32)
]


@pytest.mark.parametrize("backend,dtype,case", REFERENCE_CASES, ids=lambda p: str(p).removeprefix("torch."))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_matches_per_sequence_reference(backend, dtype, is_causal, case, monkeypatch):
    lq, lk = LENGTHS[case]
    Hq, Hk, E, Ev = (4, 2, 59, 48) if case != "one_long" else (2, 1, 64, 64)
    q, k, v, cu_q, cu_k = _packed(lq, lk, Hq, Hk, E, Ev, dtype)
    grad = randn(sum(lq), Hq, Ev, dtype=dtype)
    ours = _run(backend, monkeypatch, q, k, v, cu_q, cu_k, lq, lk, grad, is_causal=is_causal)
    _check_all(ours, q, k, v, cu_q, cu_k, grad, is_causal, 1.0 / math.sqrt(E))
    # a sequence with queries and no keys: output 0, gradient 0 (never NaN)
    for b in range(len(lq)):
        if lk[b] == 0 and lq[b] > 0:
            rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
            assert (ours[0][rows] == 0).all() and (ours[1][rows] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_logsumexp_layout(backend, is_causal):
    lq, lk = [3, 0, 20], [7, 4, 0]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 2, 2, 16, 16, torch.float32)
    fwd = varlen_attention_fwd if backend == "cpp" else torch.ops.fusedformer.triton_varlen_attention_fwd.default
    out, lse = fwd(q, k, v, cu_q, cu_k, max(lq), max(lk), is_causal, 0.25)
    assert lse.shape == (2, sum(lq)) and lse.dtype == torch.float32
    for b in range(len(lq)):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        s = torch.einsum("lhe,she->hls", q[qs].double(), k[ks].double()) * 0.25
        if is_causal:
            s = s.masked_fill(~reference.causal_mask(s.shape[1], s.shape[2]), float("-inf"))
        want = torch.logsumexp(s, -1) if lk[b] else torch.full(s.shape[:2], float("inf"), dtype=torch.float64)
        torch.testing.assert_close(lse[:, qs].double(), want, rtol=1e-5, atol=1e-5)


def _pad(x, lengths, L):
    """(total, H, E) packed -> (B, H, L, E) zero-padded."""
    out = x.new_zeros(len(lengths), x.shape[1], L, x.shape[2])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :, :n] = x[start:start + n].transpose(0, 1)
        start += n
    return out


def _unpad(x, lengths):
    return torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)], 0)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_equals_padded_sdpa(dropout_p, is_causal):
    """The cpp op on packed sequences = attention_fwd / its gradients on the padded batch with a key
    padding mask, dropout included (one seed: the same mask, by design)."""
    lengths, Hq, Hk, E = [17, 1, 97, 40], 4, 2, 64
    q, k, v, cu, _ = _packed(lengths, lengths, Hq, Hk, E, E, torch.float32)
    L, seed, scale = max(lengths), 1234, 0.125
    keep = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)
    mask = keep[:, None, None, :]
    qp, kp, vp = (_pad(t, lengths, L).requires_grad_(True) for t in (q, k, v))
    out_p, _ = attention_fwd(qp, kp, vp, mask, is_causal, scale, dropout_p, torch.tensor(seed))  # a tensor seed
    grad = _pad(randn(sum(lengths), Hq, E), lengths, L)  # 0 on the padding rows
    out_p.backward(grad)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = varlen_attention_fwd(*leaves, cu, cu, L, L, is_causal, scale, dropout_p, seed)
    out.backward(_unpad(grad, lengths))
    torch.testing.assert_close(out, _unpad(out_p.detach(), lengths), rtol=1e-5, atol=1e-5)
    for ours, padded in zip(leaves, (qp, kp, vp)):
        torch.testing.assert_close(ours.grad, _unpad(padded.grad, lengths), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dropout_mask_and_gradients(is_causal):
    """cpp dropout: the mask is attention_dropout_mask's on the padded batch; the output and every
    gradient match the float64 reference that applies that mask; the kept fraction is 1 - p."""
    lq, lk, Hq, Hk, E, p, seed = [33, 1, 70], [40, 9, 70], 4, 2, 32, 0.25, 99
    q, k, v, cu_q, cu_k = _packed(lq, lk, Hq, Hk, E, E, torch.float32)
    grad = randn(sum(lq), Hq, E)
    dmask = attention_dropout_mask(len(lq), Hq, max(lq), max(lk), p, seed)
    kept = torch.cat([dmask[b, :, :lq[b], :lk[b]].flatten() for b in range(len(lq))]).double()
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = varlen_attention_fwd(*leaves, cu_q, cu_k, max(lq), max(lk), is_causal, 1 / math.sqrt(E), p, seed)
    out.backward(grad)
    ours = (out.detach(), *(t.grad for t in leaves))
    truth = _ref(q, k, v, cu_q, cu_k, grad, is_causal, None, torch.float64, True, p, dmask)
    same = _ref(q, k, v, cu_q, cu_k, grad, is_causal, None, torch.float32, False, p, dmask)
    for name, o, s, t, factor in zip(("out", "dq", "dk", "dv"), ours, same, truth, (2, 3, 3, 3)):
        assert_error_within(name, o, s, t, factor)


def test_public_dropout_draws_from_torch_generator():
    lengths = [20, 7]
    q, k, v, cu, _ = _packed(lengths, lengths, 2, 2, 16, 16, torch.float32)
    torch.manual_seed(5)
    a = ff.varlen_attention(q, k, v, cu, cu, 20, 20, dropout_p=0.5)
    torch.manual_seed(5)
    b = ff.varlen_attention(q, k, v, cu, cu, 20, 20, dropout_p=0.5)
    c = ff.varlen_attention(q, k, v, cu, cu, 20, 20, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gradcheck_float64(dropout_p, is_causal):
    lq, lk = [3, 0, 6, 1], [4, 2, 6, 0]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 4, 2, 8, 5, torch.float64)

    def fn(q, k, v):
        return varlen_attention_fwd(q, k, v, cu_q, cu_k, 6, 6, is_causal, 0.7, dropout_p, 7)[0]

    assert torch.autograd.gradcheck(fn, [t.requires_grad_(True) for t in (q, k, v)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    lq, lk = [5, 0, 17], [9, 3, 17]
    dtype = torch.float64 if backend == "cpp" else torch.float32
    q, k, v, cu_q, cu_k = _packed(lq, lk, 4, 2, 16, 8, dtype)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    utils = torch.library._OPCHECK_DEFAULT_UTILS
    if backend == "cpp":
        fwd, bwd = torch.ops.fusedformer.varlen_attention_fwd, torch.ops.fusedformer.varlen_attention_bwd
        extra = (0.1, 3)
    else:
        fwd, bwd = torch.ops.fusedformer.triton_varlen_attention_fwd, torch.ops.fusedformer.triton_varlen_attention_bwd
        extra = ()
        # the interpreter cannot run a launcher on fake tensors (it reads their storage), so the fake
        # and AOT-dispatch checks, which do, run on a GPU only
        if backends.TRITON_INTERPRETED:
            utils = ("test_schema", "test_autograd_registration")
    args = (q, k, v, cu_q, cu_k, 17, 17, True, 0.3, *extra)
    torch.library.opcheck(fwd, args, test_utils=utils)
    out, lse = fwd(*args)
    go = randn(*out.shape, dtype=dtype)
    torch.library.opcheck(bwd, (go, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q, cu_k, 17, 17,
                                True, 0.3, *extra), test_utils=utils)  # fmt: skip


def test_compile_fullgraph():
    lengths = [5, 12]
    q, k, v, cu, _ = _packed(lengths, lengths, 2, 1, 16, 16, torch.float32)

    def fn(q, k, v):
        return varlen_attention_fwd(q, k, v, cu, cu, 12, 12, True, 0.25)[0]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=0, atol=0)


def test_every_cpu_capability(each_cpu_capability):
    lq = [17, 1, 40]
    q, k, v, cu, _ = _packed(lq, lq, 4, 2, 32, 32, torch.float32)
    grad = randn(sum(lq), 4, 32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = varlen_attention_fwd(*leaves, cu, cu, 40, 40, True, 0.2)
    out.backward(grad)
    _check_all((out.detach(), *(t.grad for t in leaves)), q, k, v, cu, cu, grad, True, 0.2)


def test_explain_names_the_backend():
    q, k, v, cu, _ = _packed([3, 4], [3, 4], 2, 2, 8, 8, torch.float32)
    assert ff.explain(ff.varlen_attention, q, k, v, cu, cu, 4, 4).backend == "cpp"
    e = ff.explain("varlen_attention", q, k, v, cu, cu, 4, 4, dropout_p=0.1)
    assert e.backend == "cpp"
    if backends.TRITON_KERNELS:
        assert any("dropout" in r for r in e.reasons["triton"])


# ---- bad input ----------------------------------------------------------------------------------


def _good():
    q, k, v, cu_q, cu_k = _packed([3, 5], [4, 2], 4, 2, 8, 8, torch.float32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=4)


BAD = [
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].long(), TypeError, "int32"),
    ("cu_seqlens_k", lambda a: a["cu_seqlens_k"].float(), TypeError, "int32"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].to("meta"), ValueError, "like query"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"][None], ValueError, "1-D"),
    ("cu_seqlens_k", lambda a: a["cu_seqlens_k"][:2], ValueError, "one length"),
    ("cu_seqlens_q", lambda a: torch.tensor([0, 6, 8], dtype=torch.int32), ValueError, "non-decreasing|> max"),
    ("cu_seqlens_q", lambda a: torch.tensor([0, 4, 3], dtype=torch.int32), ValueError, "non-decreasing"),
    ("cu_seqlens_q", lambda a: torch.tensor([1, 3, 8], dtype=torch.int32), ValueError, r"\[0\] == 0"),
    ("cu_seqlens_k", lambda a: torch.tensor([0, 4, 5], dtype=torch.int32), ValueError, "packed length"),
    ("max_seqlen_q", lambda a: 4, ValueError, "max_seqlen_q"),
    ("max_seqlen_k", lambda a: -1, ValueError, "max_seqlen_k"),
    ("q", lambda a: a["q"][None], ValueError, "3-D"),
    ("q", lambda a: a["q"].double(), TypeError, "one dtype"),
    ("q", lambda a: a["q"][:, :3], ValueError, "multiple"),
    ("k", lambda a: a["k"][..., :4], ValueError, "head dim"),
    ("v", lambda a: a["v"][:5], ValueError, "value"),
    ("q", lambda a: a["q"].long(), TypeError, "floating"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg,make,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises(backend, arg, make, exc, match, monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_BACKEND", backend)
    a = _good()
    a[arg] = make(a)
    with pytest.raises(exc, match=match):
        ff.varlen_attention(**a)


@pytest.mark.parametrize("kw,match", [({"dropout_p": 1.0}, "dropout_p"), ({"scale": float("nan")}, "scale")])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        ff.varlen_attention(**_good(), **kw)


@pytest.mark.parametrize(
    "cu_q,max_q,match",
    [
        ([0, 4, 3], 5, "non-decreasing"),
        ([1, 3, 8], 5, r"\[0\] == 0"),
        ([0, 3, 7], 5, "packed length"),
        ([0, 3, 8], 4, "max_seqlen_q"),
    ],
)
def test_cpp_op_checks_the_lengths_itself(cu_q, max_q, match):
    a = _good()
    cu = torch.tensor(cu_q, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        varlen_attention_fwd(a["q"], a["k"], a["v"], cu, a["cu_seqlens_k"], max_q, 4, False, 1.0)
    out = torch.zeros(8, 4, 8)
    with pytest.raises(ValueError, match=match):
        varlen_attention_bwd(out, a["q"], a["k"], a["v"], out, torch.zeros(4, 8), cu, a["cu_seqlens_k"], max_q, 4,
                             False, 1.0)  # fmt: skip


def test_triton_refuses_float64(monkeypatch):
    if not backends.TRITON_KERNELS:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "triton")
    a = _good()
    for name in ("q", "k", "v"):
        a[name] = a[name].double()
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        ff.varlen_attention(**a)
