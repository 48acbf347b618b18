"""ff.linear (float32 linear on oneDNN's brgemm, csrc/cpu/linear.cpp) and fusedformer.nn.Linear (the engine
measured faster per shape class): against float64, errors at most 2x (outputs) / 3x (gradients) torch's own
F.linear error in float32, awkward sizes, the op's registration, and the module's decision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedformer as ff
import fusedformer.nn.linear as fflinear
from fusedformer import handover
from fusedformer.ops.linear import linear_available, why_not_fused
from tests.conftest import assert_error_within, randn

pytestmark = pytest.mark.skipif(not linear_available(), reason="fusedformer._C without linear_fwd")

SHAPES = [  # (leading shape of input, K, N): 1, 17, 97, 1025 rows; K past one chunk (128) and not a multiple.
    # Up to 64 rows the weight is brgemm's A operand (linear_few_rows), past that it is packed: 64 and 65 rows
    ((1,), 17, 1),
    ((64,), 257, 130),
    ((65,), 257, 130),
    ((17,), 97, 130),
    ((97,), 384, 64),
    ((3, 5, 7), 129, 65),
    ((1025,), 300, 97),
    ((64,), 1536, 384),
    ((3, 100), 65, 257),  # out > in with many rows: grad_weight transposes the input (linear_bwd_weight)
]


def _check(x, w, b):
    grad = randn(*x.shape[:-1], w.shape[0])
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if b is not None else ())]
    out = ff.linear(*leaves) if b is not None else ff.linear(*leaves, None)
    out.backward(grad)
    ours = (out.detach(), *(t.grad for t in leaves))

    def ref(dtype):
        ls = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
        o = F.linear(*ls) if b is not None else F.linear(*ls, None)
        o.backward(grad.to(dtype))
        return (o.detach(), *(t.grad for t in ls))

    truth, same = ref(torch.float64), ref(torch.float32)
    for name, o, s, t, factor in zip(("out", "dx", "dw", "db"), ours, same, truth, (2, 3, 3, 3)):
        assert o.dtype == torch.float32
        assert_error_within(name, o, s, t, factor)


@pytest.mark.parametrize("lead,K,N", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_matches_float64(lead, K, N, with_bias):
    x = randn(*lead, K)
    w = randn(N, K, scale=K**-0.5)
    b = randn(N) if with_bias else None
    _check(x, w, b)


@pytest.mark.parametrize("lead,K,N", [((1,), 17, 5), ((17,), 130, 97), ((64,), 257, 130), ((65,), 97, 300),
                                      ((1025,), 300, 97), ((3, 100), 65, 257)], ids=str)  # fmt: skip
def test_weight_stored_in_out(lead, K, N):
    """A weight stored (in, out) and passed transposed (transformers' Conv1D layout: ``x @ W + b``): read in
    place by the forward (panels copied, not transposed) and by grad_input; every gradient, including the
    stored weight's through the view, within the rule against float64."""
    x, w_io, b = randn(*lead, K), randn(K, N, scale=K**-0.5), randn(N)
    assert not w_io.t().is_contiguous() and w_io.t().t().is_contiguous()
    grad = randn(*lead, N)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, w_io, b)]
        out = fn(leaves[0], leaves[1].t(), leaves[2])
        out.backward(grad.to(dtype))
        return (out.detach(), *(t.grad for t in leaves))

    ours, same, truth = run(ff.linear, torch.float32), run(F.linear, torch.float32), run(F.linear, torch.float64)
    for name, o, s_, t, factor in zip(("out", "dx", "dw", "db"), ours, same, truth, (2, 3, 3, 3)):
        assert_error_within(name, o, s_, t, factor)


def test_long_reduction_error_is_torchs_or_less():
    """K = 2048: the chunked sums keep the error at or below MKL's (a single chain gives about 3x)."""
    x, w = randn(256, 2048), randn(512, 2048, scale=2048**-0.5)
    truth = F.linear(x.double(), w.double())
    ours = (ff.linear(x, w).double() - truth).abs().max().item()
    torchs = (F.linear(x, w).double() - truth).abs().max().item()
    assert ours <= 1.5 * torchs, (ours, torchs)


def test_non_contiguous_and_edge_shapes():
    x = randn(40, 20).t()  # (20, 40), non-contiguous
    w, b = randn(7, 40), randn(7)
    torch.testing.assert_close(ff.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # no rows, no outputs, and K = 0 (the bias alone)
    assert ff.linear(randn(0, 5), randn(3, 5)).shape == (0, 3)
    assert ff.linear(randn(4, 5), randn(0, 5)).shape == (4, 0)
    assert torch.equal(ff.linear(randn(4, 0), randn(3, 0), torch.tensor([1.0, 2.0, 3.0])),
                       torch.tensor([1.0, 2.0, 3.0]).expand(4, 3))  # fmt: skip
    assert torch.equal(ff.linear(randn(2, 0), randn(3, 0)), torch.zeros(2, 3))


def test_backward_of_strided_inputs():
    """Gradients through ff.linear of a transposed 2-D input and a permuted 3-D one, against F.linear's."""
    for x in (randn(40, 20).t(), randn(7, 9, 24).permute(1, 0, 2)):
        w, b = randn(13, x.shape[-1]), randn(13)
        leaves = [[t.detach().clone().requires_grad_(True) for t in (x, w, b)] for _ in range(2)]
        grad = randn(*x.shape[:-1], 13)
        ff.linear(*leaves[0]).backward(grad)
        F.linear(*leaves[1]).backward(grad)
        for ours, ref in zip(leaves[0], leaves[1]):
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_bad_input_raises_clearly():
    with pytest.raises(RuntimeError, match="in_features"):
        ff.linear(randn(4, 5), randn(3, 6))
    with pytest.raises(RuntimeError, match="bias of shape"):
        ff.linear(randn(4, 5), randn(3, 5), randn(4))


@pytest.mark.parametrize("lead,K,N", [((1,), 17, 5), ((17,), 97, 130), ((97,), 129, 65)], ids=str)
def test_float16_in_float32(lead, K, N):
    """float16 computed in float32 and rounded once: within 2x (3x for gradients) torch's float16 error."""
    x, w, b = randn(*lead, K, dtype=torch.float16), randn(N, K, scale=K**-0.5, dtype=torch.float16), randn(N, dtype=torch.float16)
    grad = randn(*lead, N, dtype=torch.float16)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    out = ff.linear(*leaves)
    out.backward(grad)
    assert out.dtype == torch.float16 and all(t.grad.dtype == torch.float16 for t in leaves)

    def ref(dtype):
        ls = [t.detach().to(dtype).requires_grad_(True) for t in (x, w, b)]
        o = F.linear(*ls)
        o.backward(grad.to(dtype))
        return (o.detach(), *(t.grad for t in ls))

    truth, same = ref(torch.float64), ref(torch.float16)
    for name, o, s_, t, factor in zip(("out", "dx", "dw", "db"), (out.detach(), *(t.grad for t in leaves)), same,
                                      truth, (2, 3, 3, 3)):  # fmt: skip
        assert_error_within(name, o, s_, t, factor)


def test_other_dtypes_and_devices_go_to_torch():
    x, w = randn(4, 8, dtype=torch.bfloat16), randn(3, 8, dtype=torch.bfloat16)
    assert "torch's bfloat16 linear" in why_not_fused(x, w, None)
    assert "float16" in why_not_fused(randn(4, 8, dtype=torch.float16), randn(3, 8), None)
    assert torch.equal(ff.linear(x, w), F.linear(x, w))
    assert why_not_fused(randn(4, 8), randn(3, 8), None) is None
    assert why_not_fused(randn(4, 8), nn.Parameter(randn(3, 8)), None) is None

    class Sub(torch.Tensor):
        pass

    x = randn(4, 8).as_subclass(Sub)
    assert "subclass" in why_not_fused(x, randn(3, 8), None)
    assert ff.linear(x, randn(3, 8)).shape == (4, 3)


def test_explain_and_forced_backends(monkeypatch):
    x, w = randn(4, 8), randn(3, 8)
    e = ff.explain(ff.linear, x, w)
    assert e.backend == "cpp" and "brgemm" in e.detail and not e.forced
    assert "stored (in, out)" in ff.explain("linear", x, randn(8, 3).t()).detail
    e = ff.explain(ff.linear, x.bfloat16(), w.bfloat16())
    assert e.backend == "torch" and "bfloat16" in e.reasons["cpp"][0]
    for forced in ("reference", "triton"):  # no kernel of those for linear: F.linear, said so
        monkeypatch.setenv("FUSEDFORMER_BACKEND", forced)
        e = ff.explain(ff.linear, x, w)
        assert e.backend == "torch" and e.forced and forced in e.reasons["cpp"][0]
        assert torch.equal(ff.linear(x, w), F.linear(x, w))
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "cpp")
    assert ff.explain(ff.linear, x, w).backend == "cpp"


def test_opcheck():
    x, w, b = randn(5, 17, requires_grad=True), randn(9, 17, requires_grad=True), randn(9, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedformer.linear_fwd.default, (x, w, b))
    torch.library.opcheck(torch.ops.fusedformer.linear_fwd.default, (x, w, None))


def test_compile_fullgraph():
    x, w, b = randn(6, 33), randn(5, 33), randn(5)
    compiled = torch.compile(lambda x: ff.linear(x, w, b), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ff.linear(x, w, b), rtol=0, atol=0)


# ---- the backward's products (linear_bwd_input, linear_bwd_weight) --------------------------------


@pytest.mark.parametrize("rows,N,K", [(1, 1, 1), (17, 130, 97), (97, 97, 300), (1025, 257, 129), (300, 600, 40)],
                         ids=str)  # fmt: skip
def test_backward_products_match_float64(rows, N, K):
    """Each op alone against float64, within 3x torch's float32 product (grad @ weight, grad^T @ input); N
    and K on both sides of each other (grad_weight transposes the narrower operand) and past one chunk."""
    grad, weight, input = randn(rows, N), randn(N, K, scale=N**-0.5), randn(rows, K)
    g64, w64, x64 = grad.double(), weight.double(), input.double()
    from fusedformer.ops.linear import linear_bwd_input, linear_bwd_weight

    assert_error_within("grad_input", linear_bwd_input(grad, weight), grad @ weight, g64 @ w64, 3)
    assert_error_within("grad_weight", linear_bwd_weight(grad, input), grad.t() @ input, g64.t() @ x64, 3)


def test_backward_runs_the_fused_products(monkeypatch):
    """Without create_graph the backward calls the fused ops; with it, torch's differentiable products (a
    gradient penalty then matches F.linear's)."""
    import fusedformer.ops.linear as ops_linear

    called = []
    for name in ("linear_bwd_input", "linear_bwd_weight"):
        real = getattr(ops_linear, name)
        monkeypatch.setattr(ops_linear, name, lambda *a, _real=real, _name=name: called.append(_name) or _real(*a))
    x, w = randn(33, 20, requires_grad=True), randn(7, 20, requires_grad=True)
    ff.linear(x, w).square().sum().backward()
    assert sorted(called) == ["linear_bwd_input", "linear_bwd_weight"]
    called.clear()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w)]
    (gx,) = torch.autograd.grad(ff.linear(*leaves).square().sum(), leaves[0], create_graph=True)
    assert called == []  # (the second backward below runs the fused ops again, through the forward's node)
    gx.square().sum().backward()
    ref = [t.detach().clone().requires_grad_(True) for t in (x, w)]
    (rx,) = torch.autograd.grad(F.linear(*ref).square().sum(), ref[0], create_graph=True)
    rx.square().sum().backward()
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaves[1].grad, ref[1].grad, rtol=1e-4, atol=1e-4)


def test_backward_products_edge_shapes_and_errors():
    from fusedformer.ops.linear import linear_bwd_input, linear_bwd_weight

    grad, weight, input = randn(2, 3, 5), randn(5, 4), randn(2, 3, 4)
    assert linear_bwd_input(grad, weight).shape == (2, 3, 4)
    torch.testing.assert_close(linear_bwd_weight(grad, input), grad.reshape(6, 5).t() @ input.reshape(6, 4),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    g_t, w = randn(40, 9).t(), randn(40, 3)  # a non-contiguous grad
    torch.testing.assert_close(linear_bwd_input(g_t, w), g_t @ w, rtol=1e-5, atol=1e-5)
    assert torch.equal(linear_bwd_weight(randn(0, 5), randn(0, 4)), torch.zeros(5, 4))  # no rows: zeros
    assert torch.equal(linear_bwd_input(randn(3, 0), randn(0, 4)), torch.zeros(3, 4))
    assert linear_bwd_weight(randn(3, 0), randn(3, 4)).shape == (0, 4)
    with pytest.raises(RuntimeError, match="grad \\(\\*, N\\) and weight"):
        linear_bwd_input(randn(3, 5), randn(4, 4))
    with pytest.raises(RuntimeError, match="same leading shape"):
        linear_bwd_weight(randn(3, 5), randn(2, 4))
    with pytest.raises(RuntimeError, match="float32"):
        linear_bwd_input(randn(3, 5, dtype=torch.float64), randn(5, 4, dtype=torch.float64))


def test_backward_opcheck_and_compile():
    grad, weight, input = randn(5, 9), randn(9, 17), randn(5, 17)
    torch.library.opcheck(torch.ops.fusedformer.linear_bwd_input.default, (grad, weight))
    torch.library.opcheck(torch.ops.fusedformer.linear_bwd_weight.default, (grad, input))
    w = randn(5, 33, requires_grad=True)

    def step(x):
        return torch.autograd.grad(ff.linear(x, w).square().sum(), (x, w))

    x = randn(6, 33, requires_grad=True)
    compiled = torch.compile(step, backend="aot_eager")
    for a, b in zip(compiled(x), step(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- fusedformer.nn.Linear ----------------------------------------------------------------------


@pytest.fixture
def fresh_decisions():
    fflinear.reset()
    yield
    fflinear.reset()


def _module(monkeypatch, fused_ms, torch_ms, calls):
    """A Linear whose measurement is stubbed: (fused ms, torch ms); calls counts the fused op's calls."""
    m = fflinear.Linear(16, 8)
    monkeypatch.setattr(fflinear, "_measure", lambda *a: (fused_ms, torch_ms))
    real = fflinear.linear

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fflinear, "linear", counting)
    return m


@pytest.mark.parametrize("fused_ms,torch_ms,fused_serves", [(1.0, 2.0, True), (2.0, 1.0, False), (1.0, 0.98, True)])
def test_module_serves_the_measured_engine(monkeypatch, fresh_decisions, fused_ms, torch_ms, fused_serves):
    monkeypatch.delenv("FUSEDFORMER_HANDOVER", raising=False)
    calls = []
    m = _module(monkeypatch, fused_ms, torch_ms, calls)
    x = randn(3, 16)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=1e-5, atol=1e-5)
    m(x)
    assert len(calls) == (2 if fused_serves else 0)
    assert len(fflinear.decisions()) == 1
    assert ("fusedformer's oneDNN brgemm serves" if fused_serves else "F.linear (MKL) serves") in m.explain(x)


def test_module_keeps_the_fused_op_with_handover_off(monkeypatch, fresh_decisions):
    calls = []
    m = _module(monkeypatch, 2.0, 1.0, calls)  # torch would win the measurement
    x = randn(3, 16)
    with handover.off():
        m(x)
    assert len(calls) == 1 and fflinear.decisions() == {}
    monkeypatch.setenv("FUSEDFORMER_HANDOVER", "0")
    m(x)
    assert len(calls) == 2 and "not measured" in m.explain(x)


def test_module_real_measurement_and_training(fresh_decisions, monkeypatch):
    monkeypatch.delenv("FUSEDFORMER_HANDOVER", raising=False)
    torch_layer = nn.Linear(64, 32)
    m = fflinear.Linear(64, 32)
    m.load_state_dict(torch_layer.state_dict())
    x = randn(2, 50, 64, requires_grad=True)
    out = m(x)
    ((key, (fused_ms, torch_ms)),) = fflinear.decisions().items()
    assert fused_ms > 0 and torch_ms > 0 and key[-1] is True  # a training class: timed forward and backward
    with torch.no_grad():
        m(x)
    assert sorted(k[-1] for k in fflinear.decisions()) == [False, True]  # inference is its own class
    ref = torch_layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(m.weight.grad, torch_layer.weight.grad, rtol=1e-5, atol=1e-4)
    # a cast forgets the module's memo; bfloat16 then runs on F.linear
    m.to(torch.bfloat16)
    assert "_ff_linear" not in vars(m)
    xb = x.detach().to(torch.bfloat16)
    assert torch.equal(m(xb), F.linear(xb, m.weight, m.bias)) and "F.linear serves" in m.explain(xb)


def test_gpt2_conv1d_twin_runs_on_ff_linear(monkeypatch):
    """ff.patch swaps transformers' Conv1D (GPT-2's linear layers, weight stored (in, out)) for its measured twin;
    with every fused kernel serving (handover off), logits and the Conv1D weights' gradients within the rule
    against the float64 model; unpatch restores the class."""
    import copy

    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from fusedformer.patching import patch, unpatch

    config = transformers.GPT2Config(vocab_size=99, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    plain, wide = copy.deepcopy(model), copy.deepcopy(model).double()
    report = patch(model)
    assert len(report.replaced["Conv1D -> ff.linear (measured)"]) == 8  # c_attn, c_proj, c_fc, c_proj per block
    conv = model.transformer.h[0].mlp.c_fc
    assert isinstance(conv, Conv1D) and type(conv) is fflinear.conv1d_twin(Conv1D)
    calls = []
    real = fflinear.linear
    monkeypatch.setattr(fflinear, "linear", lambda *a: calls.append(a[1].shape) or real(*a))
    for ids in (torch.randint(0, 99, (3, 70)), torch.randint(0, 99, (1, 5))):  # 210 rows (panels) and 5
        def run(m):
            m.zero_grad(set_to_none=True)
            logits = m(ids).logits
            logits.float().square().mean().backward()
            return [logits.detach()] + [c.weight.grad for c in m.modules() if isinstance(c, Conv1D)]

        calls.clear()
        with handover.off():
            ours = run(model)
        # the 8 Conv1D, and lm_head (an nn.Linear); c_attn first, its weight seen as (out, in) = (192, 64)
        assert len(calls) == 9 and calls[0] == (3 * 64, 64)
        for name, o, s_, t in zip(["logits"] + [f"conv{i}.weight.grad" for i in range(8)], ours, run(plain),
                                  run(wide)):  # fmt: skip
            assert_error_within(name, o, s_, t, 3)
    unpatch(model)
    assert type(conv) is Conv1D


def test_patch_swaps_linear_and_back():
    from fusedformer.patching import patch, unpatch

    net = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    x = randn(5, 8)
    before = net(x)
    report = patch(net)
    assert type(net[0]) is fflinear.Linear and report.replaced["Linear"] == ["0", "2"]
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    unpatch(net)
    assert type(net[0]) is nn.Linear
