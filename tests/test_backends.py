"""Backend selection: explain, FUSEDFORMER_BACKEND, FUSEDFORMER_STRICT, fallback warnings, profiles."""

from __future__ import annotations

import warnings

import pytest
import torch

import fusedformer as ff
from fusedformer import backends
from tests.conftest import randn


@pytest.fixture
def qkv():
    return randn(1, 2, 16, 8), randn(1, 2, 16, 8), randn(1, 2, 16, 8)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FUSEDFORMER_BACKEND", raising=False)
    monkeypatch.delenv("FUSEDFORMER_STRICT", raising=False)
    backends._warned.clear()


def test_explain_names_the_serving_backend_and_the_others_reasons(qkv):
    e = ff.explain(ff.layer_norm, randn(4, 8), (8,))
    assert e.backend == "cpp" and not e.forced
    assert e.reasons["cpp"] == []
    if backends.TRITON_INTERPRETED:  # conftest sets TRITON_INTERPRET=1: triton could serve, cpp is first
        assert e.reasons["triton"] == []
    else:
        assert e.reasons["triton"], "triton must say why it cannot serve CPU tensors"
    assert "layer_norm: served by 'cpp'" in str(e)
    assert ff.explain("gelu", randn(3)).backend == "cpp"


def _grad_mask():
    """A float mask that requires grad: no fused kernel gives the mask a gradient, so this call falls back."""
    return torch.zeros(16, 16, requires_grad=True)


def test_explain_says_why_a_call_runs_on_the_reference_path(qkv):
    e = ff.explain(ff.scaled_dot_product_attention, *qkv, attn_mask=_grad_mask())
    assert e.backend == "reference"
    assert any("requires grad" in r for r in e.reasons["cpp"])
    assert "requires grad" in str(e)


def test_explain_says_dropout_is_fused_on_both_backends(qkv):
    e = ff.explain(ff.scaled_dot_product_attention, *qkv, dropout_p=0.1)
    assert e.backend == "cpp" and e.reasons["cpp"] == []
    if backends.TRITON_INTERPRETED:
        assert e.reasons["triton"] == []
    cuda = backends.Request("attention", torch.device("cuda"), torch.float16, 0.1)
    assert not any("dropout" in r for r in backends.TritonBackend().not_supported_reasons(cuda))


@pytest.mark.parametrize("op", ["attention", "layer_norm", "gelu"])
def test_bf16_on_a_gpu_below_sm80_falls_back_and_explain_says_why(op, monkeypatch):
    """bf16 Triton needs sm_80: on a T4 (sm_75) or V100 (sm_70) the Triton backend declines bf16 calls
    with the reason, where it would otherwise fail to compile. The capability query is monkeypatched:
    no GPU here."""
    if backends._TRITON_ERROR is not None:
        pytest.skip(backends._TRITON_ERROR)
    cuda = torch.device("cuda", 0)
    for cap in ((7, 5), (7, 0)):
        monkeypatch.setattr(backends, "cuda_capability", lambda device, cap=cap: cap)
        e = backends.explain_request(backends.Request(op, cuda, torch.bfloat16))
        assert e.backend == "reference"
        why = "; ".join(e.reasons["triton"])
        assert "sm_80" in why and f"sm_{cap[0]}{cap[1]}" in why
        assert "sm_80" in str(e)
        assert backends.TritonBackend().not_supported_reasons(backends.Request(op, cuda, torch.float16)) == []
    for cap in ((8, 0), (9, 0)):
        monkeypatch.setattr(backends, "cuda_capability", lambda device, cap=cap: cap)
        request = backends.Request(op, cuda, torch.bfloat16)
        assert backends.TritonBackend().not_supported_reasons(request) == []


def test_explain_checks_inputs_like_the_call():
    with pytest.raises(ValueError, match="normalized_shape"):
        ff.explain(ff.layer_norm, randn(4, 8), (7,))
    with pytest.raises(ValueError, match="expected one of"):
        ff.explain("softmax", randn(3))


def test_fallback_warns_once_and_names_the_reason(qkv):
    with pytest.warns(ff.FallbackWarning, match="requires grad"):
        ff.scaled_dot_product_attention(*qkv, attn_mask=_grad_mask())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff.scaled_dot_product_attention(*qkv, attn_mask=_grad_mask())  # the same reason: no second warning
        ff.scaled_dot_product_attention(*qkv, dropout_p=0.5)  # fused: no warning at all


def test_strict_turns_fallback_into_an_error(qkv, monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_STRICT", "1")
    with pytest.raises(ff.BackendUnavailableError, match="requires grad"):
        ff.scaled_dot_product_attention(*qkv, attn_mask=_grad_mask())
    ff.layer_norm(randn(4, 8), (8,))  # a fused call is unaffected
    ff.scaled_dot_product_attention(*qkv, dropout_p=0.5)


def test_forced_reference_backend_runs_the_reference(monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "reference")
    x = randn(4, 8)
    assert ff.explain(ff.gelu, x).backend == "reference"
    with torch.profiler.profile() as prof:
        ff.gelu(x)
    assert not any(e.name.startswith("fusedformer::") for e in prof.events())


def test_forced_backend_that_cannot_serve_raises(qkv, monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "cpp")
    with pytest.raises(ff.BackendUnavailableError, match="requires grad"):
        ff.scaled_dot_product_attention(*qkv, attn_mask=_grad_mask())
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "triton")
    with pytest.raises(ff.BackendUnavailableError, match="float64"):
        ff.scaled_dot_product_attention(*(t.double() for t in qkv))
    if backends.TRITON_INTERPRETED:  # dropout is fused in Triton too: the forced backend serves it
        ff.scaled_dot_product_attention(*qkv, dropout_p=0.1)


def test_unknown_backend_name_is_an_error(monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FUSEDFORMER_BACKEND"):
        ff.gelu(randn(4))


def test_profile_shows_fused_ops_serving_the_public_api():
    q, k, v = randn(1, 2, 64, 16), randn(1, 2, 64, 16), randn(1, 2, 64, 16)
    x = randn(8, 32, requires_grad=True)
    with torch.profiler.profile() as prof:
        ff.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = ff.gelu(ff.layer_norm(x, (32,)), bias=randn(32))
        y.sum().backward()
    names = {e.name for e in prof.events()}
    for op in ("attention_fwd", "layer_norm_fwd", "layer_norm_bwd", "gelu_fwd", "gelu_bwd"):
        assert f"fusedformer::{op}" in names, f"fusedformer::{op} did not run; ran: {sorted(names)[:20]}"


def test_cpu_capability_is_reported_and_switchable():
    from fusedformer import _C

    assert _C.cpu_capability() in ("default", "avx2", "avx512", "avx512bf16")
    with pytest.raises(RuntimeError, match="expected 'default'"):
        _C.set_cpu_capability("sse9")


def test_import_and_explain_without_triton():
    """CPU-only users may not have triton: the package imports, runs, and explain says triton is missing."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, fusedformer as ff\n"
        "x = torch.randn(4, 8)\n"
        "ff.layer_norm(x, (8,)); ff.gelu(x)\n"
        "print(ff.explain(ff.gelu, x))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "triton is not installed" in out.stdout


@pytest.mark.parametrize("cap", ["default", "avx2"])
def test_cpu_capability_from_the_environment(cap):
    import subprocess
    import sys

    code = "from fusedformer import _C; print(_C.cpu_capability())"
    env = {**__import__("os").environ, "FUSEDFORMER_CPU_CAPABILITY": cap}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == cap
