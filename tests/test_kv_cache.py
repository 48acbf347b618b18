"""ff.attention_with_kv_cache: against the float64 per-sequence reference, the cache contents after the
append, ragged lengths, GQA, every dtype, a step-by-step decode equal to causal attention, errors raised
before anything is written, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

import fusedformer as ff
from fusedformer import reference

from .conftest import DTYPES

op = torch.ops.fusedformer.attention_with_kv_cache.default
FLOOR = {torch.float64: 1e-12}


def _max_err(x, truth):
    return (x.double() - truth.double()).abs().max().item() if x.numel() else 0.0


def make(B, Hq, Hk, L, S_max, E, Ev, dtype, append=True):
    q = torch.randn(B, Hq, L, E, dtype=dtype)
    k_cache, v_cache = torch.randn(B, Hk, S_max, E, dtype=dtype), torch.randn(B, Hk, S_max, Ev, dtype=dtype)
    k = torch.randn(B, Hk, L, E, dtype=dtype) if append else None
    v = torch.randn(B, Hk, L, Ev, dtype=dtype) if append else None
    return q, k_cache, v_cache, k, v


def check(q, k_cache, v_cache, k, v, lens, is_causal, scale=None):
    """Runs the fused op on copies of the caches; holds the output to the 2x rule against the float64
    reference and the caches to exactness (appended rows equal k/v, every other row untouched)."""
    kc, vc = k_cache.clone(), v_cache.clone()
    out = ff.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens, is_causal=is_causal, scale=scale)
    wide = [None if t is None else t.double() for t in (q, k_cache, v_cache, k, v)]
    kc64, vc64 = wide[1].clone(), wide[2].clone()
    truth = reference.attention_with_kv_cache(wide[0], kc64, vc64, wide[3], wide[4], lens, is_causal, scale)
    same = reference.attention_with_kv_cache(q, k_cache.clone(), v_cache.clone(), k, v, lens, is_causal, scale,
                                             upcast=False)
    assert out.dtype == q.dtype and out.shape == truth.shape
    assert torch.isfinite(out).all()
    err, ref_err = _max_err(out, truth), _max_err(same, truth)
    assert err <= 2 * ref_err + FLOOR.get(q.dtype, 0.0), f"error {err:.3e} > 2 x the {q.dtype} reference's {ref_err:.3e}"
    # the caches: exactly the float64 reference's, which wrote the same values
    assert torch.equal(kc.double(), kc64) and torch.equal(vc.double(), vc64)
    return out, kc, vc


# (B, Hq, Hk, L, S_max, E, Ev, lengths before the call): decode steps (L = 1, ragged, an empty sequence,
# the awkward lengths), GQA, Ev != E, a chunk appended after earlier entries, and uniform prefills
# (the attention forward's path) from empty caches.
CASES = [
    (1, 1, 1, 1, 1, 16, 16, [0]),
    (4, 12, 12, 1, 1100, 64, 64, [0, 17, 97, 1024]),
    (3, 8, 2, 1, 300, 64, 64, [1, 250, 299]),
    (2, 16, 1, 1, 200, 80, 59, [150, 0]),
    (2, 4, 4, 17, 300, 64, 64, [0, 200]),  # ragged chunk: the decode kernel, bottom-right
    (3, 6, 2, 5, 130, 32, 32, [7, 7, 7]),  # uniform, after earlier entries (n != L)
    (2, 4, 4, 97, 97, 64, 64, [0, 0]),  # uniform prefill from empty caches: the attention forward
    (2, 8, 2, 33, 64, 128, 128, [0, 0]),
]


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])) + f"-{c[7]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_and_appends(case, is_causal, dtype):
    B, Hq, Hk, L, S_max, E, Ev, before = case
    q, k_cache, v_cache, k, v = make(B, Hq, Hk, L, S_max, E, Ev, dtype)
    with torch.no_grad():
        check(q, k_cache, v_cache, k, v, torch.tensor(before, dtype=torch.int32), is_causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_append(dtype):
    """No key/value: the caches are only read (n_b = cache_seqlens[b], or S_max for every sequence)."""
    q, k_cache, v_cache, _, _ = make(3, 4, 2, 1, 257, 64, 64, dtype, append=False)
    check(q, k_cache, v_cache, None, None, torch.tensor([0, 100, 257]), True)
    check(q, k_cache, v_cache, None, None, None, True)
    q2 = torch.randn(3, 4, 3, 64, dtype=dtype)  # three queries, bottom-right: the last sees everything
    check(q2, k_cache, v_cache, None, None, torch.tensor([2, 100, 257], dtype=torch.int64), True)


def test_int_lengths_and_scale():
    q, k_cache, v_cache, k, v = make(2, 4, 4, 1, 80, 32, 32, torch.float32)
    out, kc, _ = check(q, k_cache, v_cache, k, v, torch.tensor([40, 40]), True, scale=0.3)
    kc2 = k_cache.clone()
    out2 = ff.attention_with_kv_cache(q, kc2, v_cache.clone(), k, v, cache_seqlens=40, scale=0.3)
    assert torch.equal(out, out2) and torch.equal(kc, kc2)


def test_empty_sequences_give_zero():
    q, k_cache, v_cache, _, _ = make(2, 2, 2, 3, 64, 16, 16, torch.float32, append=False)
    out = ff.attention_with_kv_cache(q, k_cache, v_cache, cache_seqlens=torch.tensor([0, 2]))
    assert (out[0] == 0).all()
    assert (out[1, :, 0] == 0).all()  # bottom-right: query 0 of 3 sees entries j <= 2 - 3 + 0: none
    assert (out[1, :, 1:] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_step_by_step_decode_equals_causal_attention(dtype):
    """A prefill of 37 tokens then 30 decode steps, token by token, through a cache of 80 entries, gives
    what causal attention over the whole 67-token sequence gives (GQA, batch 2)."""
    B, Hq, Hk, T, P, E = 2, 8, 2, 67, 37, 64
    q, k, v = (torch.randn(B, h, T, E, dtype=dtype) for h in (Hq, Hk, Hk))
    k_cache = torch.full((B, Hk, 80, E), float("nan"), dtype=dtype)  # never read past the lengths
    v_cache = torch.full((B, Hk, 80, E), float("nan"), dtype=dtype)
    outs = [ff.attention_with_kv_cache(q[:, :, :P], k_cache, v_cache, k[:, :, :P], v[:, :, :P], cache_seqlens=0)]
    for t in range(P, T):
        s = slice(t, t + 1)
        outs.append(ff.attention_with_kv_cache(q[:, :, s], k_cache, v_cache, k[:, :, s], v[:, :, s], cache_seqlens=t))
    out = torch.cat(outs, dim=2)
    truth = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    same = reference.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, upcast=False)
    assert torch.isfinite(out).all()
    assert _max_err(out, truth) <= 2 * _max_err(same, truth)
    assert torch.equal(k_cache[:, :, :T], k) and torch.equal(v_cache[:, :, :T], v)
    assert k_cache[:, :, T:].isnan().all()


def _bad_inputs():
    q, kc, vc, k, v = make(2, 4, 2, 1, 16, 8, 8, torch.float32)
    lens = torch.tensor([3, 15], dtype=torch.int32)
    yield "overflow", (q, kc, vc, k, v, torch.tensor([3, 16])), "overflows"
    yield "negative length", (q, kc, vc, k, v, torch.tensor([-1, 2])), ">= 0"
    yield "float lengths", (q, kc, vc, k, v, lens.float()), "integer"
    yield "lengths shape", (q, kc, vc, k, v, lens[:1]), "cache_seqlens of shape"
    yield "lengths device", (q, kc, vc, k, v, lens.to("meta")), "cache_seqlens on"
    yield "key without lengths", (q, kc, vc, k, v, None), "expected cache_seqlens"
    yield "key without value", (q, kc, vc, k, None, lens), "both"
    yield "key dtype", (q, kc, vc, k.double(), v.double(), lens), "dtype"
    yield "cache dtype", (q, kc, vc.half(), k, v, lens), "dtype"
    yield "key shape", (q, kc, vc, k[:, :1], v[:, :1], lens), "key"
    yield "heads", (q[:, :3], kc, vc, k, v, lens), "multiple"
    yield "head dim", (q[..., :4], kc, vc, k, v, lens), "E"
    yield "batch", (q, kc[:1], vc[:1], k, v, lens), "k_cache"
    yield "3-D query", (q[0], kc, vc, k, v, lens), "4-D"


@pytest.mark.parametrize("entry", ["public", "op"])
def test_bad_inputs_raise_before_writing(entry):
    for name, (q, kc, vc, k, v, lens), match in _bad_inputs():
        kc0, vc0 = kc.clone(), vc.clone()
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            if entry == "public":
                ff.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens)
            else:
                op(q, kc, vc, k, v, lens, True, 0.5)
        assert match.lower() in str(info.value).lower(), f"{name}: {info.value}"
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0), f"{name}: the cache was written"


def test_requires_grad_raises():
    q, kc, vc, k, v = make(1, 2, 2, 1, 8, 8, 8, torch.float32)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        ff.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=0)
    assert not kc.isnan().any()
    with torch.no_grad():
        ff.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=0)


def test_reference_backend_gives_the_same(monkeypatch):
    q, kc, vc, k, v = make(3, 4, 2, 2, 70, 32, 32, torch.float64)
    lens = torch.tensor([0, 30, 68])
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    fused = ff.attention_with_kv_cache(q, kc1, vc1, k, v, cache_seqlens=lens)
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "reference")
    assert ff.explain("attention_with_kv_cache", q, kc, vc, k, v, cache_seqlens=lens).backend == "reference"
    ref = ff.attention_with_kv_cache(q, kc2, vc2, k, v, cache_seqlens=lens)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    with pytest.raises(ValueError, match="overflows"):
        ff.attention_with_kv_cache(q, kc2, vc2, k, v, cache_seqlens=torch.tensor([0, 30, 69]))
    assert torch.equal(kc1, kc2)


def test_explain_names_the_backend(monkeypatch):
    q, kc, vc, _, _ = make(1, 2, 2, 1, 8, 8, 8, torch.float32, append=False)
    e = ff.explain(ff.attention_with_kv_cache, q, kc, vc, cache_seqlens=3)
    assert e.backend == "cpp"
    assert "served by 'cpp'" in str(e)
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "reference")
    assert ff.explain(ff.attention_with_kv_cache, q, kc, vc, cache_seqlens=3).backend == "reference"


def test_opcheck():
    q, kc, vc, k, v = make(2, 4, 2, 1, 70, 32, 32, torch.float32)
    torch.library.opcheck(op, (q, kc, vc, k, v, torch.tensor([3, 60]), True, 0.25))
    torch.library.opcheck(op, (q, kc, vc, None, None, None, False, 0.25))


def test_compiles_fullgraph():
    q, kc, vc, k, v = make(2, 4, 2, 1, 70, 32, 32, torch.float32)
    lens = torch.tensor([3, 60])

    def step(q, kc, vc, k, v, lens):
        return ff.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens) * 2

    kc1, vc1 = kc.clone(), vc.clone()
    eager = step(q, kc1, vc1, k, v, lens)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc, k, v, lens)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert torch.equal(kc, kc1) and torch.equal(vc, vc1)  # the in-place append survives functionalization
