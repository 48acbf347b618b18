"""fusedformer.handover: small inference calls of ff.nn.LayerNorm / ff.nn.GELU handed to torch's function
where that measured faster. Which one is faster depends on the machine, so the tests that check what each
verdict does fix the verdict (``_measure`` patched); one test runs the real measurement and checks only
what must hold whatever it finds."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fusedformer as ff
import fusedformer.nn as ffnn
from fusedformer import handover

from .conftest import randn

D = 48


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    monkeypatch.delenv("FUSEDFORMER_BACKEND", raising=False)
    monkeypatch.delenv("FUSEDFORMER_HANDOVER", raising=False)
    handover.reset()
    yield
    handover.reset()


def verdict(monkeypatch, torch_serves: bool) -> list:
    """Every measurement answers ``torch_serves``; returns the list of shapes measured."""
    measured = []

    def fake(input, fused, theirs):
        measured.append(tuple(input.shape))
        return handover.Decision(torch_serves, 2e-6, 1e-6 if torch_serves else 3e-6, tuple(input.shape))

    monkeypatch.setattr(handover, "_measure", fake)
    return measured


def spy(monkeypatch):
    """Counts the calls of F.layer_norm / F.gelu as the modules see them (handover's F)."""
    calls = {"layer_norm": 0, "gelu": 0}
    real_ln, real_gelu = F.layer_norm, F.gelu

    def ln(*a, **k):
        calls["layer_norm"] += 1
        return real_ln(*a, **k)

    def gelu(*a, **k):
        calls["gelu"] += 1
        return real_gelu(*a, **k)

    monkeypatch.setattr(ffnn.normalization.F, "layer_norm", ln)
    monkeypatch.setattr(ffnn.activation.F, "gelu", gelu)
    return calls


def modules():
    ln = ffnn.LayerNorm(D)
    with torch.no_grad():
        ln.weight.copy_(randn(D)), ln.bias.copy_(randn(D))
    return ln, ffnn.GELU(), ffnn.GELU(approximate="tanh")


@pytest.mark.parametrize("torch_serves", [True, False])
def test_the_verdict_decides_who_runs_and_explain_says_it(monkeypatch, torch_serves):
    measured = verdict(monkeypatch, torch_serves)
    calls = spy(monkeypatch)
    ln, gelu, gelu_tanh = modules()
    x = randn(3, 17, D)
    with torch.no_grad():
        for m, name, ref in (
            (ln, "layer_norm", lambda t: F.layer_norm(t, (D,), ln.weight, ln.bias, ln.eps)),
            (gelu, "gelu", F.gelu),
            (gelu_tanh, "gelu", lambda t: F.gelu(t, approximate="tanh")),
        ):
            expected = ref(x)
            before = calls[name]
            y = m(x)
            assert (calls[name] - before == 1) == torch_serves
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
            e = m.explain(x)
            assert (e.backend == "torch") == torch_serves, str(e)
            assert ("serves this size class" in str(e)) and ("measured" in str(e))
    # one measurement per class: LayerNorm, GELU erf, GELU tanh
    assert len(measured) == 3 and all(s == (3, 17, D) for s in measured)
    with torch.no_grad():
        ln(x), gelu(x), gelu_tanh(randn(3, 17, D))  # the same classes: no new measurement
    assert len(measured) == 3


def test_a_size_class_is_measured_once(monkeypatch):
    measured = verdict(monkeypatch, True)
    ln = ffnn.LayerNorm(D)
    with torch.no_grad():
        ln(randn(3, D)), ln(randn(4, D)), ln(randn(5, D))  # 144, 192, 240 elements: one power-of-two class
        ln(randn(40, D))  # another class
        ffnn.LayerNorm(D)(randn(5, D))  # another module, a known class: no measurement
    assert measured == [(3, D), (40, D)]
    assert len(handover.decisions()) == 2


def test_training_and_grad_mode_always_run_fused(monkeypatch):
    measured = verdict(monkeypatch, True)
    calls = spy(monkeypatch)
    ln, gelu, _ = modules()
    x = randn(4, D, requires_grad=True)
    y = gelu(ln(x))
    y.sum().backward()
    assert calls == {"layer_norm": 0, "gelu": 0} and measured == []
    assert x.grad is not None
    assert ln.explain(x).backend != "torch"
    # grad mode on, no tensor requiring grad: still fused (handing over is for no_grad / inference_mode)
    ln(x.detach())
    assert calls["layer_norm"] == 0


@pytest.mark.parametrize("env", [{"FUSEDFORMER_HANDOVER": "0"}, {"FUSEDFORMER_BACKEND": "cpp"}])
def test_the_environment_keeps_the_fused_kernel(monkeypatch, env):
    measured = verdict(monkeypatch, True)
    calls = spy(monkeypatch)
    ln, gelu, _ = modules()
    x = randn(4, D)
    with torch.inference_mode():
        ln(x), gelu(x)
        assert calls == {"layer_norm": 1, "gelu": 1}  # handed over first
        for name, value in env.items():
            monkeypatch.setenv(name, value)  # read on every call: takes effect at once
        ln(x), gelu(x)
        assert calls == {"layer_norm": 1, "gelu": 1}
        assert ln.explain(x).backend == "cpp" and gelu.explain(x).backend == "cpp"
        for name in env:
            monkeypatch.delenv(name)
        ln(x), gelu(x)
        assert calls == {"layer_norm": 2, "gelu": 2}
    assert len(measured) == 2


def test_large_calls_other_dtypes_and_subclasses_run_fused(monkeypatch):
    measured = verdict(monkeypatch, True)
    calls = spy(monkeypatch)
    ln = ffnn.LayerNorm(D)
    with torch.no_grad():
        ln(randn(handover.MAX_ELEMENTS // D + 1, D))  # above the measured range
        ln(randn(4, D, dtype=torch.bfloat16))  # fp32 parameters: the fused path casts them
        ln(torch.nn.Parameter(randn(4, D)))  # not a plain tensor
        ln(randn(0, D))
    assert calls["layer_norm"] == 0 and measured == []


def test_reset_and_moving_the_module_measure_again(monkeypatch):
    measured = verdict(monkeypatch, True)
    ln = ffnn.LayerNorm(D)
    x = randn(4, D)
    with torch.no_grad():
        ln(x)
        assert ln._ff_handover
        handover.reset()
        assert not ln.__dict__.get("_ff_handover") and handover.decisions() == {}
        ln(x)
        assert len(measured) == 2
        ln.double()  # nn.Module._apply: the memo goes
        assert not ln.__dict__.get("_ff_handover")
        y = ln(x.double())
    assert y.dtype == torch.float64 and len(measured) == 3


def test_the_real_measurement(monkeypatch):
    """Unpatched: the first call measures both (a decision with two positive times), its verdict is
    what explain reports and what runs, the results match torch's, and the user's RNG stream is untouched."""
    calls = spy(monkeypatch)
    ln, gelu, _ = modules()
    x = randn(2, 14, D)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with torch.no_grad():
        y_ln, y_gelu = ln(x), gelu(x)
    assert torch.equal(torch.rand(3), expected_next), "measuring drew from the user's generator"
    for op, module, name in (("layer_norm", ln, "layer_norm"), ("gelu", gelu, "gelu")):
        options = module._handover_options() if op == "layer_norm" else (module.approximate,)
        d = handover.known(op, x, options)
        assert d is not None and d.fused_seconds > 0 and d.torch_seconds > 0 and d.shape == tuple(x.shape)
        assert d.torch_serves == (d.torch_seconds < handover.MARGIN * d.fused_seconds)
        with torch.no_grad():
            before = calls[name]
            module(x)
            assert (calls[name] - before == 1) == d.torch_serves
            assert (module.explain(x).backend == "torch") == d.torch_serves
        assert module.explain(x).backend != "torch"  # grad mode on: such a call runs fused
    torch.testing.assert_close(y_ln, F.layer_norm(x, (D,), ln.weight, ln.bias, ln.eps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_gelu, F.gelu(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert "layer_norm" in str(ln.explain(x)) and " us " in str(ln.explain(x))


def test_compiled_modules_do_not_hand_over(monkeypatch):
    measured = verdict(monkeypatch, True)
    ln = ffnn.LayerNorm(D)
    x = randn(4, D)
    torch._dynamo.reset()
    compiled = torch.compile(ln, fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
    torch.testing.assert_close(y, F.layer_norm(x, (D,), ln.weight, ln.bias, ln.eps), rtol=1e-5, atol=1e-5)
    assert measured == []


def test_off_keeps_the_fused_kernel(monkeypatch):
    """``handover.off()`` (what ff.patch(verify=True) runs under) keeps the fused kernel, then lets go."""
    verdict(monkeypatch, True)
    calls = spy(monkeypatch)
    ln = ffnn.LayerNorm(D)
    x = randn(4, D)
    with torch.no_grad():
        with handover.off():
            ln(x)
            assert ln.explain(x).backend != "torch"
        assert calls["layer_norm"] == 0
        ln(x)
        assert calls["layer_norm"] == 1


# ---- attention in a patched Hugging Face model (fusedformer.patching.hf) --------------------------------


def _bert(layers: int = 2):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=128, attn_implementation="sdpa")
    plain = transformers.BertModel(config).eval()
    patched = copy.deepcopy(plain)
    ff.patch(patched)
    ids = torch.randint(1, 100, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padding: a bool mask reaches the attention function
    return plain, patched, dict(input_ids=ids, attention_mask=mask)


def _fused_attention_calls(fn) -> tuple[object, int]:
    with torch.profiler.profile() as prof:
        out = fn()
    return out, sum(e.name == "fusedformer::attention_fwd" for e in prof.events())


@pytest.mark.parametrize("torch_serves", [True, False])
def test_hf_attention_verdict_decides_who_runs(monkeypatch, torch_serves):
    measured = verdict(monkeypatch, torch_serves)
    plain, patched, batch = _bert()
    with torch.no_grad():
        expected = plain(**batch).last_hidden_state
        out, fused = _fused_attention_calls(lambda: patched(**batch).last_hidden_state)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (3, 4, 14, 16) in measured  # the query (B, H, L, E), measured on its first call
    assert fused == (0 if torch_serves else 2)
    attention = [d for k, d in handover.decisions().items() if k[0] == "attention"]
    assert len(attention) == 1 and attention[0].torch_serves is torch_serves
    # the module's memo answers the second call: nothing measured again
    n = len(measured)
    with torch.no_grad():
        patched(**batch)
    assert len(measured) == n


def test_hf_attention_in_training_or_large_runs_fused(monkeypatch):
    measured = verdict(monkeypatch, True)
    plain, patched, batch = _bert()
    _, fused = _fused_attention_calls(lambda: patched(**batch).last_hidden_state.sum().backward())
    assert fused == 2 and not [m for m in measured if len(m) == 4]  # grad mode on: never handed over, never measured
    from fusedformer.patching import hf

    monkeypatch.setattr(hf, "HANDOVER_MAX_SCORES", 3 * 4 * 14 * 14 - 1)  # one score too many
    with torch.no_grad():
        _, fused = _fused_attention_calls(lambda: patched(**batch))
    assert fused == 2 and not [m for m in measured if len(m) == 4]
    monkeypatch.setenv("FUSEDFORMER_HANDOVER", "0")
    monkeypatch.setattr(hf, "HANDOVER_MAX_SCORES", 1 << 18)
    with torch.no_grad():
        _, fused = _fused_attention_calls(lambda: patched(**batch))
    assert fused == 2 and not [m for m in measured if len(m) == 4]


def test_hf_attention_real_measurement():
    """Whatever the machine finds: the same outputs, one attention decision with both times."""
    plain, patched, batch = _bert()
    with torch.no_grad():
        expected = plain(**batch).last_hidden_state
        out = patched(**batch).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    attention = [d for k, d in handover.decisions().items() if k[0] == "attention"]
    assert len(attention) == 1
    assert attention[0].fused_seconds > 0 and attention[0].torch_seconds > 0
    assert attention[0].torch_serves == (attention[0].torch_seconds < handover.MARGIN * attention[0].fused_seconds)
