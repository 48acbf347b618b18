"""Inference forwards: ``fusedformer::attention_fwd(..., inference=True)``.

When no input needs a gradient, ff.scaled_dot_product_attention promises the op that no backward
follows. The CPU kernels then take the engine measured fastest for a forward alone (which may differ
from the training one, so a backward through such a call raises), and the decode kernel sums float32
scores lane-wise (no transposes) instead of in the order that the backward repeats. These tests hold
that path to the forward's house rule (max abs error against float64 at most 2x that of
the reference run in the input's dtype) on every engine this machine has, check that the flag follows
the gradient state (eagerly and under torch.compile), and that a backward through such a call raises.
"""

from __future__ import annotations

import pytest
import torch

import fusedformer as ff
from fusedformer import backends, reference
from fusedformer.ops.attention import attention_dropout_mask

_C = backends._C
op = torch.ops.fusedformer
pytestmark = pytest.mark.skipif(_C is None, reason="needs the compiled extension (fusedformer._C)")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FLOOR = {torch.float64: 1e-12}  # as tests/test_attention.py: float64's reference has no error


@pytest.fixture(autouse=True)
def _cpp_backend(monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "cpp")


@pytest.fixture(params=["native", "brgemm-f32", "brgemm"])
def engine(request):
    """Each engine kind forced in turn (the one a dtype lacks falls back, see set_attention_engine)."""
    names = ("float32", "float64", "bfloat16", "float16")
    for name in names:
        _C.set_attention_engine(name, request.param)
    yield request.param
    for name in names:
        _C.set_attention_engine(name, "auto")


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b).abs().max().item() if a.numel() else 0.0


def check_inference(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The no-gradient forward against float64, the 2x rule; returns its output."""
    dtype = q.dtype
    kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    with torch.no_grad():
        out = ff.scaled_dot_product_attention(q, k, v, **kwargs)
    up = lambda t: t.double() if t is not None and t.is_floating_point() else t  # noqa: E731
    truth = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), up(attn_mask),
                                                   is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    same = reference.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=enable_gqa, upcast=False)
    assert out.dtype == dtype and out.shape == truth.shape
    assert torch.isfinite(out).all()
    err, ref_err = _err(out, truth), _err(same, truth)
    assert err <= 2 * ref_err + FLOOR.get(dtype, 0.0), f"error {err:.3e} > 2 x the {dtype} reference's {ref_err:.3e}"
    return out


def qkv(B, Hq, Hk, L, S, E, Ev, dtype):
    return (torch.randn(B, Hq, L, E, dtype=dtype), torch.randn(B, Hk, S, E, dtype=dtype),
            torch.randn(B, Hk, S, Ev, dtype=dtype))


SHAPES = [(1, 17, 64, 64), (17, 97, 16, 128), (97, 256, 128, 128), (256, 17, 80, 59), (97, 1025, 59, 16),
          (1025, 97, 64, 80), (1025, 1025, 64, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L, S, E, Ev", SHAPES)
def test_shapes(L, S, E, Ev, is_causal, dtype, engine):
    torch.manual_seed(L * 7 + S)
    check_inference(*qkv(1, 2, 2, L, S, E, Ev, dtype), is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float", "float+causal"])
def test_masks(kind, dtype, engine):
    torch.manual_seed(3)
    q, k, v = qkv(2, 3, 3, 130, 300, 64, 64, dtype)
    if kind == "bool":
        mask = torch.rand(2, 1, 130, 300) > 0.6
        mask[0, 0, 5] = False  # a dead row gives 0
    else:
        # rows that see only a few keys: where the scores' rounding shows most
        mask = torch.where(torch.rand(130, 300) > 0.97, 0.0, -torch.inf).to(dtype)
        mask[:, 0] = 0.0
        mask = mask + torch.randn(130, 300, dtype=dtype)
    out = check_inference(q, k, v, attn_mask=mask, is_causal=kind.endswith("causal"))
    if kind == "bool":
        assert (out[0, :, 5] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_and_scale(dtype, engine):
    torch.manual_seed(5)
    check_inference(*qkv(2, 8, 2, 200, 333, 64, 48, dtype), is_causal=True, scale=0.3, enable_gqa=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, Hq, Hk, L, S, E, Ev, is_causal",
    [
        (4, 12, 12, 1, 300, 64, 64, False),  # generation: one token per sequence
        (1, 1, 1, 1, 2000, 59, 40, False),   # one (batch, head): the keys in chunks over the threads, merged
        (2, 16, 1, 1, 777, 32, 32, False),   # GQA: 16 query heads on one kv head
        (2, 8, 2, 3, 1025, 80, 64, True),    # a few queries, causal top-left
        (1, 4, 4, 16, 64, 17, 16, False),    # the largest decode shape, the fewest keys, E not a multiple of 8
    ],
)
def test_decode_shapes(B, Hq, Hk, L, S, E, Ev, is_causal, dtype):
    """Decode-shaped inference calls run the decode kernel, float32 scores in lane-wise sums (no
    transposes): the forward's 2x rule, with and without a mask."""
    torch.manual_seed(B * 1000 + S)
    q, k, v = qkv(B, Hq, Hk, L, S, E, Ev, dtype)
    check_inference(q, k, v, is_causal=is_causal, enable_gqa=Hq != Hk)
    mask = torch.randn(L, S, dtype=dtype)
    mask[:, :: 3] = -torch.inf
    check_inference(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=Hq != Hk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout(dtype, engine):
    """The op with inference=True and dropout: the kernels' own mask (attention_dropout_mask), applied in
    the reference, within the forward's 2x rule."""
    torch.manual_seed(9)
    B, H, L, S, p = 2, 3, 150, 200, 0.3
    q, k, v = qkv(B, H, H, L, S, 64, 64, dtype)
    seed = torch.tensor([1234], dtype=torch.int64)
    out, _ = op.attention_fwd(q, k, v, None, True, 0.125, p, seed, True)
    keep = attention_dropout_mask(B, H, L, S, p, 1234)
    truth = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), None, p, True, 0.125,
                                                   dropout_mask=keep)
    same = reference.scaled_dot_product_attention(q, k, v, None, p, True, 0.125, upcast=False, dropout_mask=keep)
    assert _err(out, truth) <= 2 * _err(same, truth)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_tiled_forward_sums_its_scores_one_way(engine, dtype):
    """On one engine the tiled forward sums S = Q K^T the same way whatever the flag (the backward's way):
    inference and training forwards agree bit for bit. (The flag picks the engine, and the decode kernel's
    float32 sums.)"""
    torch.manual_seed(11)
    q, k, v = qkv(1, 2, 2, 97, 300, 64, 64, dtype)
    out_inf, lse_inf = op.attention_fwd(q, k, v, None, True, 0.125, 0.0, None, True)
    out_train, lse_train = op.attention_fwd(q, k, v, None, True, 0.125, 0.0, None, False)
    assert torch.equal(out_inf, out_train) and torch.equal(lse_inf, lse_train)


def _flags(monkeypatch) -> list[bool]:
    """Records the inference flag of each attention_fwd call made through backends.call."""
    seen: list[bool] = []
    real = backends.call

    def spy(fn, *args):
        if fn is torch.ops.fusedformer.attention_fwd.default:
            seen.append(args[8])
        return real(fn, *args)

    monkeypatch.setattr(backends, "call", spy)
    return seen


def test_the_flag_follows_the_gradient_state(monkeypatch):
    seen = _flags(monkeypatch)
    q, k, v = qkv(1, 2, 2, 33, 40, 16, 16, torch.float32)
    ff.scaled_dot_product_attention(q, k, v)  # no input needs a gradient
    with torch.no_grad():
        ff.scaled_dot_product_attention(q.requires_grad_(), k, v)  # grad mode off
    ff.scaled_dot_product_attention(q, k, v)  # q requires grad: a backward may follow
    with torch.inference_mode():
        ff.scaled_dot_product_attention(q.detach(), k, v)
    ff.scaled_dot_product_attention(q.detach(), k, v.requires_grad_())  # v alone requires grad
    assert seen == [True, True, False, True, False]


def test_a_backward_through_an_inference_call_raises():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 20, 20, 16, 16, torch.float32))
    out, _ = op.attention_fwd(q, k, v, None, False, 0.25, 0.0, None, True)
    with pytest.raises(RuntimeError, match="inference=True"):
        out.sum().backward()


def test_the_training_forward_still_gives_exact_single_key_rows():
    """With a gradient needed, the forward sums S the backward's way (a query that sees one key: out is
    that key's value exactly, and its grad_value is grad_out exactly); without, out is still that value."""
    torch.manual_seed(13)
    q, k, v = qkv(1, 2, 2, 4, 300, 64, 64, torch.float32)
    keep = torch.zeros(1, 1, 4, 300, dtype=torch.bool)
    keep[0, 0, torch.arange(4), torch.tensor([3, 77, 150, 299])] = True
    with torch.no_grad():
        inf = ff.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ff.scaled_dot_product_attention(*leaves, attn_mask=keep)
    g = torch.randn_like(out)
    out.backward(g)
    for i, j in enumerate([3, 77, 150, 299]):
        assert torch.equal(out[0, :, i].detach(), v[0, :, j]) and torch.equal(inf[0, :, i], v[0, :, j])
        assert torch.equal(leaves[2].grad[0, :, j], g[0, :, i])


def test_opcheck_inference():
    q, k, v = qkv(1, 2, 2, 33, 70, 32, 32, torch.float32)
    mask = torch.randn(33, 70)
    torch.library.opcheck(op.attention_fwd.default, (q, k, v, mask, True, 0.2, 0.0, None, True))


def test_torch_compile_traces_the_flag():
    """torch.compile bakes the flag from the gradient state at trace time (guarded): an inference graph
    and a training graph of one function, the training one differentiable."""
    torch.manual_seed(17)
    q, k, v = qkv(2, 4, 4, 64, 96, 32, 32, torch.float32)
    fn = lambda q, k, v: ff.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*leaves).sum().backward()  # would raise if the inference graph were reused
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    fn(*eager).sum().backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_the_engine_report_names_the_inference_engine():
    info = _C.attention_engine("float32")
    assert info["inference"] in info["candidates"]
    if info["how"] == "measured":
        assert set(info["inference_ms"]) == set(info["candidates"])
        assert min(info["inference_ms"], key=info["inference_ms"].get) == info["inference"]
    q = torch.randn(1, 2, 64, 32)
    text = str(ff.explain(ff.scaled_dot_product_attention, q, q, q))
    assert "no input needing a gradient: " + info["inference"] in text


def test_every_engine_recomputes_the_forwards_scores(engine):
    """The tiled kernels (L = 97 queries, not decode-shaped) on each engine: the backward recomputes S with
    the forward's sums (oneDNN's single chains or the micro-kernel's chunks), so a query that sees one key
    gets P = 1 exactly in both: out is that key's value and grad_value is grad_out, bit for bit."""
    torch.manual_seed(17)
    q, k, v = qkv(1, 2, 2, 97, 300, 64, 64, torch.float32)
    cols = torch.randperm(300)[:97]  # distinct keys: each key's gradient comes from one query
    keep = torch.zeros(1, 1, 97, 300, dtype=torch.bool)
    keep[0, 0, torch.arange(97), cols] = True
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ff.scaled_dot_product_attention(*leaves, attn_mask=keep)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(out.detach(), v[:, :, cols])
    assert torch.equal(leaves[2].grad[:, :, cols], g)
