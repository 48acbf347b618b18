"""Fused attention dropout on the CPU: ff.scaled_dot_product_attention(..., dropout_p > 0).

The kernels draw the mask from a counter-based hash of (seed, b, h, i, j) (csrc/cpu/kernels/dropout.h);
fusedformer::attention_dropout_mask returns the same mask densely. Each test pins the seed the public
function draws, asks for that mask, and holds the kernel to the house rule (DESIGN.md) against the
reference given the same mask: error at most 2x (output) / 3x (gradients) the error of the reference in
the input's own dtype, both against the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedformer as ff
from fusedformer import backends, reference
from fusedformer.ops import attention as ops_attention
from fusedformer.ops.attention import attention_dropout_mask
from tests.conftest import assert_error_within, check_compiled_dropout
from tests.test_attention import NAMES, _run, _upcast, qkv

op = torch.ops.fusedformer
SEED = 0x5EED_1234_ABCD


def seed_tensor(value: int) -> torch.Tensor:
    """The ops' seed argument: a () int64 tensor (drawn inside the graph under torch.compile)."""
    return torch.tensor(value, dtype=torch.int64)


@pytest.fixture(autouse=True)
def _cpp_backend(monkeypatch):
    # forced: a fallback to the reference path would raise instead of testing the reference against itself
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "cpp")


@pytest.fixture
def fixed_seed(monkeypatch):
    """Pins the seed the public function draws, so the test can ask for the mask the kernels apply."""
    monkeypatch.setattr(ops_attention, "_dropout_seed", lambda: torch.tensor(SEED))
    return SEED


def check_dropout(query, key, value, dropout_p, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                  seed=SEED, grad_out=None):
    """ff.scaled_dot_product_attention with dropout (seed pinned to ``seed``) against the reference given
    the kernels' mask. Returns [out, grad_query, grad_key, grad_value] of the fused kernel."""
    dtype = query.dtype
    L, S = query.shape[-2], key.shape[-2]
    batch = query.shape[:-2]
    keep = attention_dropout_mask(math.prod(query.shape[:-3]), query.shape[-3] if query.dim() >= 3 else 1, L, S,
                                  dropout_p, seed).reshape(*batch, L, S)
    kwargs = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if grad_out is None:
        grad_out = torch.randn(*query.shape[:-1], value.shape[-1], dtype=dtype)
    inputs = (query, key, value)
    fused = _run(ff.scaled_dot_product_attention, inputs, grad_out, attn_mask=attn_mask, **kwargs)
    truth = _run(reference.scaled_dot_product_attention, [t.double() for t in inputs], _upcast(grad_out),
                 attn_mask=_upcast(attn_mask), dropout_mask=keep, **kwargs)
    same_dtype = _run(reference.scaled_dot_product_attention, inputs, grad_out, attn_mask=attn_mask, upcast=False,
                      dropout_mask=keep, **kwargs)
    # conftest's rule, with its small floor: where a row has a single key its exact dQ is 0, which the
    # reference gets exactly and the kernel up to a rounding residue (dP * D - delta, see csrc/cpu/kernels/attention.cpp)
    for name, f, s, t, factor in zip(NAMES, fused, same_dtype, truth, (2, 3, 3, 3)):
        assert f.dtype == dtype, f"{name}: {f.dtype}"
        assert_error_within(name, f, s, t, factor)
    return fused


# ---- against the reference with the same mask ----------------------------------------------------

SHAPES = [  # (L, S, E, Ev)
    (1, 1, 16, 16),
    (1, 17, 64, 64),
    (17, 1, 59, 59),
    (17, 97, 16, 32),
    (97, 17, 64, 64),
    (97, 256, 40, 48),
    (256, 256, 64, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L, S, E, Ev", SHAPES)
def test_dropout_shapes(L, S, E, Ev, is_causal, dtype, fixed_seed):
    # every row sees a single key: S = 1, or one query under a causal mask
    single_key = S == 1 or (L == 1 and is_causal)
    if single_key and dtype in (torch.bfloat16, torch.float32):
        return _check_single_key(*qkv(2, 2, 2, L, S, E, Ev, dtype), 0.1, is_causal)
    check_dropout(*qkv(2, 2, 2, L, S, E, Ev, dtype), 0.1, is_causal=is_causal)


def _check_single_key(query, key, value, dropout_p, is_causal):
    """Every row sees a single key: out and dV under the house rule; dQ and dK to a stated bound.

    The exact dQ and dK are 0 there (softmax over one key is constant), and the reference in the same
    dtype gets 0 exactly (its softmax backward subtracts dP from itself), so the 3x rule leaves no room.
    The kernel's delta = rowsum(dO * O) (FlashAttention-2's formulation) does not cancel dP exactly:
    - bfloat16: delta reads the saved output, rounded to bfloat16 (O = V / (1 - p) rounds, unit roundoff
      u = 2^-9), while dP is summed in float32: the row residue r is at most u * sum_e |dO_e| |V_e| / (1 - p);
    - float32: O = V / (1 - p) rounds once (u = 2^-24) and delta and dP are two E-term dot products
      summed in different orders, each within E * u * sum_e |dO_e| |V_e| (the recursive-summation bound):
      r is at most (2 E + 1) * u * sum_e |dO_e| |V_e| / (1 - p).
    dQ = scale * r * K, dK = scale * sum_i r_i * Q_i. Held here to twice that bound.
    """
    L, E = query.shape[-2], query.shape[-1]
    unit = 2.0**-9 if query.dtype == torch.bfloat16 else (2 * value.shape[-1] + 1) * 2.0**-24
    scale = 1.0 / math.sqrt(E)
    grad_out = torch.randn(*query.shape[:-1], value.shape[-1], dtype=query.dtype)
    keep = attention_dropout_mask(query.shape[0], query.shape[1], L, key.shape[-2], dropout_p, SEED)
    kwargs = dict(dropout_p=dropout_p, is_causal=is_causal)
    fused = _run(ff.scaled_dot_product_attention, (query, key, value), grad_out, **kwargs)
    truth = _run(reference.scaled_dot_product_attention, [t.double() for t in (query, key, value)],
                 _upcast(grad_out), dropout_mask=keep, **kwargs)
    same_dtype = _run(reference.scaled_dot_product_attention, (query, key, value), grad_out, upcast=False,
                      dropout_mask=keep, **kwargs)
    assert_error_within("out", fused[0], same_dtype[0], truth[0], 2)
    assert_error_within("grad_value", fused[3], same_dtype[3], truth[3], 3)
    # (B, H, L): the largest residue delta can carry, per row
    v0 = value[..., :1, :].double().abs()  # the one key every row sees is key 0
    row = (grad_out.double().abs() * v0).sum(-1) / (1 - dropout_p) * unit
    dq_bound = 2 * scale * row.max().item() * key[..., :1, :].double().abs().max().item()
    dk_bound = 2 * scale * (row.unsqueeze(-1) * query.double().abs()).sum(-2).max().item()
    assert fused[1].double().abs().max().item() <= dq_bound, "grad_query beyond the residue bound"
    assert fused[2].double().abs().max().item() <= dk_bound, "grad_key beyond the residue bound"


@pytest.mark.parametrize("dropout_p", [0.01, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dropout_rates(dropout_p, dtype, fixed_seed):
    check_dropout(*qkv(1, 3, 3, 70, 130, 32, 32, dtype), dropout_p, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["bool", "float", "padding"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dropout_with_masks(is_causal, kind, dtype, fixed_seed):
    B, H, L, S = 2, 2, 97, 130
    if kind == "bool":
        mask = torch.rand(B, H, L, S) < 0.7
    elif kind == "float":
        mask = (torch.randn(1, H, L, S) * 2).to(dtype)
        mask[..., 1:][torch.rand(1, H, L, S - 1) < 0.2] = float("-inf")
    else:
        mask = (torch.arange(S)[None, :] < torch.tensor([130, 40])[:, None])[:, None, None, :]
    check_dropout(*qkv(B, H, H, L, S, 64, 40, dtype), 0.2, attn_mask=mask, is_causal=is_causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Hk", [2, 1])
def test_dropout_gqa(Hk, is_causal, dtype, fixed_seed):
    q, k, v = qkv(2, 8, Hk, 97, 80, 64, 32, dtype)
    check_dropout(q, k, v, 0.1, attn_mask=torch.rand(2, 1, 97, 80) < 0.8, is_causal=is_causal, enable_gqa=True)


def test_dropout_ranks_and_layouts(fixed_seed):
    # 3-D (H, L, E) and 5-D (B1, B2, H, L, E): the mask is drawn for the flattened (B, H, L, S)
    check_dropout(*(t[0] for t in qkv(1, 3, 3, 50, 33, 24, 16)), 0.3, is_causal=True)
    q, k, v = torch.randn(2, 3, 4, 40, 24), torch.randn(2, 3, 2, 60, 24), torch.randn(2, 3, 2, 60, 8)
    check_dropout(q, k, v, 0.3, attn_mask=torch.randn(3, 1, 40, 60), enable_gqa=True, is_causal=True)
    # (B, L, H, E) layouts transposed, and an all-stride-0 grad_out (out.sum().backward())
    B, H, L, S, E = 2, 3, 70, 90, 40
    q, k, v = (torch.randn(B, n, H, E).transpose(1, 2) for n in (L, S, S))
    check_dropout(q, k, v, 0.2, grad_out=torch.ones(1).expand(B, H, L, E))


def test_dropout_cpu_capabilities(each_cpu_capability, fixed_seed):
    """Every build of the kernels draws the same mask (the tests' mask comes from the glue's scalar code)."""
    for dtype in (torch.float32, torch.float64):
        check_dropout(*qkv(1, 2, 2, 97, 130, 59, 80, dtype), 0.25, is_causal=True)
        q, k, v = qkv(2, 4, 2, 70, 90, 40, 24, dtype)
        check_dropout(q, k, v, 0.25, attn_mask=torch.rand(2, 4, 70, 90) < 0.8, enable_gqa=True)


@pytest.mark.parametrize(
    "Hk, is_causal, mask_kind", [(2, True, None), (2, False, "bool"), (1, True, "float"), (1, False, None)]
)
def test_dropout_gradcheck(Hk, is_causal, mask_kind, fixed_seed):
    """The op is deterministic given the seed: gradcheck sees one fixed function of q, k, v."""
    B, Hq, L, S = 2, 2, 6, 9
    q, k, v = (t.requires_grad_() for t in qkv(B, Hq, Hk, L, S, 5, 3, torch.float64))
    mask = {
        None: None,
        "bool": torch.rand(B, Hq, L, S) < 0.7,
        "float": torch.randn(1, Hq, L, S, dtype=torch.float64),
    }[mask_kind]
    keep = attention_dropout_mask(B, Hq, L, S, 0.3, SEED)
    assert 0 < keep.sum() < keep.numel(), "the mask must drop some and keep some for the test to mean anything"

    def fn(q, k, v):
        return ff.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.3, is_causal=is_causal, enable_gqa=True
        )

    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---- the mask: rate, independence, seeds ---------------------------------------------------------


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_kept_fraction(dropout_p):
    B, H, L, S = 2, 4, 512, 512
    keep = attention_dropout_mask(B, H, L, S, dropout_p, 12345).double()
    n = keep.numel()
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / n)
    assert abs(keep.mean().item() - (1 - dropout_p)) < 5 * sigma
    # per (b, h) block, per row and per key: no structure along any index
    block_sigma = math.sqrt(dropout_p * (1 - dropout_p) / (L * S))
    assert (keep.mean(dim=(2, 3)) - (1 - dropout_p)).abs().max() < 5 * block_sigma
    for dim in (2, 3):  # the spread of row / column means is that of independent draws
        means = keep.mean(dim=dim)
        expected = math.sqrt(dropout_p * (1 - dropout_p) / 512)
        assert 0.9 * expected < means.std().item() < 1.1 * expected
    # neighbours (along i, along j, across heads) are uncorrelated
    x = keep - keep.mean()
    var = (x * x).mean().item()
    for a, b in ((x[..., 1:, :], x[..., :-1, :]), (x[..., 1:], x[..., :-1]), (x[:, 1:], x[:, :-1])):
        corr = (a * b).mean().item() / var
        assert abs(corr) < 5 / math.sqrt(a.numel()), f"correlation {corr:.2e} between neighbours"


def test_seeds():
    a = attention_dropout_mask(1, 2, 64, 64, 0.5, 1)
    b = attention_dropout_mask(1, 2, 64, 64, 0.5, 2)
    assert torch.equal(a, attention_dropout_mask(1, 2, 64, 64, 0.5, 1))
    assert (a != b).double().mean() > 0.4  # about half the elements differ between independent masks
    assert (a[0, 0] != a[0, 1]).double().mean() > 0.4  # heads draw differently (GQA: per query head)
    assert (a[0, 0] != a[0, 0].T).double().mean() > 0.4  # and rows differently from keys
    # an element's draw depends on (seed, b * H + h, i, j) only, not on L, S or B
    assert torch.equal(attention_dropout_mask(3, 2, 100, 200, 0.5, 1)[:1, :, :64, :64], a)
    assert attention_dropout_mask(0, 2, 5, 5, 0.5, 1).shape == (0, 2, 5, 5)
    assert attention_dropout_mask(1, 1, 8, 8, 0.0, 1).all()
    with pytest.raises(RuntimeError, match="dropout_p in"):
        attention_dropout_mask(1, 1, 8, 8, 1.0, 1)


def test_same_seed_same_output_and_different_seeds_differ():
    q, k, v = qkv(2, 4, 4, 97, 130, 32, 32)
    out1, lse1 = op.attention_fwd(q, k, v, None, True, 0.2, 0.3, seed_tensor(7))
    out2, lse2 = op.attention_fwd(q, k, v, None, True, 0.2, 0.3, seed_tensor(7))
    out3, lse3 = op.attention_fwd(q, k, v, None, True, 0.2, 0.3, seed_tensor(8))
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    assert not torch.allclose(out1, out3)
    # the logsumexp is that of the un-dropped probabilities
    out0, lse0 = op.attention_fwd(q, k, v, None, True, 0.2)
    assert torch.equal(lse1, lse0) and torch.equal(lse3, lse0)
    go = torch.randn_like(out1)
    g1 = op.attention_bwd(go, q, k, v, out1, lse1, None, True, 0.2, 0.3, seed_tensor(7))
    g2 = op.attention_bwd(go, q, k, v, out1, lse1, None, True, 0.2, 0.3, seed_tensor(7))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_manual_seed_makes_the_public_function_reproducible():
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 4, 50, 60, 32, 32))

    def run():
        out = ff.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        return [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]

    torch.manual_seed(1234)
    first = run()
    second = run()  # the generator moved on: a new mask
    torch.manual_seed(1234)
    again = run()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], second[0])


def test_zero_dropout_is_the_plain_kernel():
    q, k, v = qkv(2, 4, 2, 97, 130, 32, 32)
    mask = torch.rand(2, 1, 97, 130) < 0.8
    plain = op.attention_fwd(q, k, v, mask, True, 0.2)
    dropless = op.attention_fwd(q, k, v, mask, True, 0.2, 0.0, seed_tensor(99))
    assert all(torch.equal(a, b) for a, b in zip(plain, dropless))
    out = ff.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, scale=0.2, enable_gqa=True,
                                          dropout_p=0.0)
    # no input needs a gradient: the public function runs the op's inference forward
    assert torch.equal(out, op.attention_fwd(q, k, v, mask, True, 0.2, 0.0, None, True)[0])
    go = torch.randn_like(out)
    plain_grads = op.attention_bwd(go, q, k, v, *plain, mask, True, 0.2)
    grads = op.attention_bwd(go, q, k, v, *plain, mask, True, 0.2, 0.0, seed_tensor(99))
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, grads))


def test_dropout_expectation():
    """Averaged over seeds, the dropped output is the plain one (dropout is unbiased)."""
    q, k, v = qkv(1, 2, 2, 33, 40, 16, 16)
    plain, _ = op.attention_fwd(q, k, v, None, False, 0.25)
    n = 400
    mean = sum(op.attention_fwd(q, k, v, None, False, 0.25, 0.5, seed_tensor(s))[0] for s in range(n)) / n
    # each output is a sum over ~40 keys of P v with P ~ 1/40 and v ~ N(0, 1): its dropout noise has a
    # standard deviation of about |v| sqrt(sum P^2) ~ 0.2 per draw, 0.01 over 400 draws
    assert (mean - plain).abs().max() < 0.1
    assert (mean - plain).abs().mean() < 0.02


# ---- the ops: opcheck, errors, torch.compile -----------------------------------------------------


def _dropout_samples():
    q, k, v = qkv(2, 4, 2, 37, 21, 24, 16)
    samples = [(q, k, v, None, True, 0.3, 0.1, seed_tensor(5)),
               (q, k, v, torch.rand(2, 1, 37, 21) < 0.8, False, 0.2, 0.5, seed_tensor(-3))]
    q, k, v = (t.double() for t in qkv(1, 2, 2, 19, 30, 8, 8))
    mask = torch.randn(19, 30, dtype=torch.float64)[None, None]
    samples.append((q, k, v, mask, True, 0.5, 0.2, seed_tensor(2**61)))
    return samples


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_with_dropout(sample):
    args = _dropout_samples()[sample]
    torch.library.opcheck(op.attention_fwd.default, args)
    out, lse = op.attention_fwd(*args)
    q, k, v, mask, is_causal, scale, p, seed = args
    torch.library.opcheck(op.attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, mask, is_causal,
                                                     scale, p, seed))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(op.attention_fwd.default, (q, k, v, mask, is_causal, scale, p, seed))


def test_opcheck_dropout_mask():
    torch.library.opcheck(op.attention_dropout_mask.default, (2, 3, 17, 9, 0.3, 11))


@pytest.mark.parametrize("bwd", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("dropout_p", [-0.1, 1.0, float("nan")])
def test_bad_dropout_p(dropout_p, bwd):
    q, k, v = qkv(1, 2, 2, 8, 6, 16, 16)
    with pytest.raises(RuntimeError, match="dropout_p in"):
        if bwd:
            out, lse = op.attention_fwd(q, k, v, None, False, 0.25)
            grad = torch.randn_like(out)
            op.attention_bwd(grad, q, k, v, out, lse, None, False, 0.25, dropout_p, seed_tensor(0))
        else:
            op.attention_fwd(q, k, v, None, False, 0.25, dropout_p, seed_tensor(0))


def test_torch_compile_fullgraph_with_dropout():
    """The seed is a tensor drawn inside the graph: fullgraph=True compiles; torch.manual_seed reproduces
    a compiled run, another seed gives other results, gradients flow; with Inductor told to draw random
    numbers as eager does, the compiled run is the eager one."""
    q, k, v = qkv(2, 4, 2, 50, 70, 32, 16)
    mask = torch.rand(2, 1, 50, 70) < 0.8

    def fn(q, k, v):
        out = ff.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1, is_causal=True,
                                              enable_gqa=True)
        return out.sin().sum()

    first = check_compiled_dropout(fn, (q, k, v))
    no_dropout = [t.detach().requires_grad_() for t in (q, k, v)]
    plain = ff.scaled_dot_product_attention(*no_dropout, attn_mask=mask, is_causal=True, enable_gqa=True)
    plain.sin().sum().backward()
    assert not torch.allclose(first[2], no_dropout[2].grad)


def test_dropout_is_served_fused(monkeypatch):
    """No fallback: the cpp backend serves dropout (explain says so, and a strict run does not raise)."""
    monkeypatch.delenv("FUSEDFORMER_BACKEND")
    monkeypatch.setenv("FUSEDFORMER_STRICT", "1")
    q, k, v = qkv(1, 2, 2, 16, 16, 8, 8)
    assert ff.explain(ff.scaled_dot_product_attention, q, k, v, dropout_p=0.1).backend == "cpp"
    with torch.profiler.profile() as prof:
        ff.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    assert "fusedformer::attention_fwd" in {e.name for e in prof.events()}
    assert backends.explain_request(backends.Request("attention", q.device, q.dtype, 0.1)).backend == "cpp"
