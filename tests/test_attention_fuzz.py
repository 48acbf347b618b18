"""A property-based fuzz of ff.scaled_dot_product_attention on the cpp backend: 1,000 random calls
(``FUZZ_EXAMPLES``), each against the float64 reference under the house rule (conftest's
``assert_error_within``: error <= 2x, 3x for gradients, the reference's error in the same dtype).

Each call draws: dtype (float32, float64, bfloat16, float16); batch, heads and GQA groups; lengths
L, S in 1..48 and head dims E, Ev in {1, 8, 16, 17, 32, 59, 64}; the layout of every input (contiguous,
or (B, L, H, E) transposed to (B, H, L, E) as a projection gives it, or a strided slice); one of no
mask, is_causal, a bool mask, an additive float mask with -inf entries, broadcast over batch and heads
or not; an explicit scale or none; and whether the backward runs too. A bool/-inf mask always keeps
one key per row, since the reference's own backward is NaN on a row with none (tested in test_attention.py).
Hypothesis' example database is off: the run is seeded (``derandomize``), the same 1,000 calls each time;
FUSEDFORMER_TEST_SEED reseeds it.
"""

from __future__ import annotations

import os

import pytest
import torch

import fusedformer as ff
from fusedformer import reference
from tests.conftest import assert_error_within

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_EXAMPLES = 1000
DIMS = [1, 8, 16, 17, 32, 59, 64]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _tensor(data, shape, dtype, gen):
    """Standard-normal data in ``dtype`` of ``shape`` (B, H, N, D), in a drawn memory layout."""
    B, H, N, D = shape
    layout = data.draw(st.sampled_from(["contiguous", "transposed", "sliced"]), label="layout")
    if layout == "transposed":  # (B, N, H, D) storage, as a projection followed by view + transpose gives
        t = torch.randn(B, N, H, D, dtype=torch.float64, generator=gen).to(dtype).transpose(1, 2)
    elif layout == "sliced":  # every other row of a larger tensor
        t = torch.randn(B, H, 2 * N, D, dtype=torch.float64, generator=gen).to(dtype)[:, :, ::2]
    else:
        t = torch.randn(B, H, N, D, dtype=torch.float64, generator=gen).to(dtype)
    assert t.shape == shape
    return t


def _mask(data, kind, B, Hq, L, S, dtype, gen):
    """A mask broadcastable to (B, Hq, L, S) that keeps at least one key per row."""
    shape = data.draw(st.sampled_from([(B, Hq, L, S), (1, 1, L, S), (L, S), (B, 1, L, S), (1, Hq, 1, S)]),
                      label="mask shape")
    keep = torch.rand(shape, generator=gen) < data.draw(st.sampled_from([0.2, 0.5, 0.9]), label="keep")
    rows = keep.reshape(-1, shape[-1])
    rows[torch.arange(rows.shape[0]), torch.randint(0, S, (rows.shape[0],), generator=gen)] = True
    if kind == "bool":
        return keep
    bias = torch.randn(shape, dtype=torch.float64, generator=gen) * 2
    return bias.masked_fill(~keep, float("-inf")).to(dtype)


def _fuzz(dtypes, examples: int) -> list[tuple[str, str]]:
    """Runs ``examples`` random calls at ``dtypes``; returns every violation of the house rule (all of them,
    not just the first: Hypothesis would stop and shrink at the first)."""
    violations: list[tuple[str, str]] = []  # ("broken" | "rule", message)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def one_call(data):
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed")
                                            ^ int(os.environ.get("FUSEDFORMER_TEST_SEED", "0")))
        dtype = data.draw(st.sampled_from(dtypes), label="dtype")
        B, Hk = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 2), label="Hk")
        groups = data.draw(st.integers(1, 3), label="groups")
        Hq = Hk * groups
        L, S = data.draw(st.integers(1, 48), label="L"), data.draw(st.integers(1, 48), label="S")
        E, Ev = data.draw(st.sampled_from(DIMS), label="E"), data.draw(st.sampled_from(DIMS), label="Ev")
        q = _tensor(data, (B, Hq, L, E), dtype, gen)
        k = _tensor(data, (B, Hk, S, E), dtype, gen)
        v = _tensor(data, (B, Hk, S, Ev), dtype, gen)
        kind = data.draw(st.sampled_from(["none", "causal", "bool", "float"]), label="mask")
        mask = _mask(data, kind, B, Hq, L, S, dtype, gen) if kind in ("bool", "float") else None
        kwargs = dict(is_causal=kind == "causal", enable_gqa=groups > 1,
                      scale=data.draw(st.sampled_from([None, 0.3, 1.7]), label="scale"))
        backward = data.draw(st.booleans(), label="backward")
        grad_out = torch.randn(B, Hq, L, Ev, dtype=torch.float64, generator=gen).to(dtype)

        def run(fn, inputs, m, **kw):
            leaves = [t.detach().clone().requires_grad_(backward) for t in inputs]
            out = fn(*leaves, attn_mask=m, **kw, **kwargs)
            if not backward:
                return [out.detach()]
            return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]

        ours = run(ff.scaled_dot_product_attention, (q, k, v), mask)
        truth = run(reference.scaled_dot_product_attention, [t.double() for t in (q, k, v)],
                    mask.double() if mask is not None and mask.is_floating_point() else mask)
        same = run(reference.scaled_dot_product_attention, (q, k, v), mask, upcast=False)
        names = ("out", "grad_query", "grad_key", "grad_value")
        where = (f"at {dtype} B={B} Hq={Hq} Hk={Hk} L={L} S={S} E={E} Ev={Ev} mask={kind} "
                 f"strides={[t.stride() for t in (q, k, v)]} scale={kwargs['scale']}")
        for name, o, s, t, factor in zip(names, ours, same, truth, (2, 3, 3, 3)):
            if o.dtype != dtype or o.shape != t.shape or not torch.isfinite(o).all():
                violations.append(("broken", f"{name}: {o.dtype} {tuple(o.shape)} finite={bool(torch.isfinite(o).all())} {where}"))
                continue
            try:
                assert_error_within(name, o, s, t, factor)
            except AssertionError as e:
                violations.append(("rule", f"{str(e).splitlines()[0]} {where}"))

    one_call()
    return violations


@pytest.fixture(scope="module")
def fuzz_results(_cpp_backend_module):
    return _fuzz(DTYPES, FUZZ_EXAMPLES)


def test_attention_fuzz_runs_and_is_finite(fuzz_results):
    """Every call returns outputs and gradients of the right dtype and shape, all finite."""
    broken = [m for kind, m in fuzz_results if kind == "broken"]
    assert not broken, f"{len(broken)} broken calls:\n" + "\n".join(broken)


# NOTE [2026-12-02] Found by this fuzz and not fixed yet: about 1% of calls, all at a tiny L or S (L = 1..3
# or S = 2..3; every dtype but float64), exceed the house rule, up to 6x PyTorch's error for grad_query in
# float32 at L=1, S=3, E=64 and 2x the 3x bound in bfloat16 at L=1, S=20. PyTorch's own error there is a
# fraction of an ulp (a couple of terms), while the kernels' exp polynomial (float32: 9.7e-8 relative) and
# the backward's D = rowsum(dO * O) (FlashAttention's form, which cancels against dP less exactly than a
# softmax backward from the same dP) cost an ulp or two. strict: once the kernels meet the rule here this
# XPASSes and fails, so the mark comes off.
@pytest.mark.xfail(strict=True, reason="~1% of tiny-L/S calls exceed the 2x/3x rule (NOTE [2026-12-02] above)")
def test_attention_fuzz_meets_the_house_rule(fuzz_results):
    rule = [m for kind, m in fuzz_results if kind == "rule"]
    assert not rule, f"{len(rule)} of {FUZZ_EXAMPLES} calls exceed the rule:\n" + "\n".join(rule)


@pytest.fixture(scope="module")
def _cpp_backend_module():
    # forced: a fallback would raise rather than fuzz the reference against itself
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSEDFORMER_BACKEND", "cpp")
        yield
