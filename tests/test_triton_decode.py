"""The Triton decode kernels (fusedformer/kernels/decode.py) under Triton's interpreter: split-key attention for few
query rows, as served to ff.scaled_dot_product_attention by the Triton backend and to
ff.attention_with_kv_cache, against the float64 reference; the kernels compiled for sm_80 as a GPU would.

The rule as in test_triton.py: error <= 2 x the same-dtype reference's error (float32 gets a tiny floor
where both round alike)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton or fusedformer.kernels is imported

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import fusedformer as ff  # noqa: E402
from fusedformer import reference  # noqa: E402
from fusedformer.kernels import _common, decode  # noqa: E402
from fusedformer.kernels.attention import attention_backward, attention_forward  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _common.INTERPRET, reason="fusedformer.kernels was imported compiled for a GPU (TRITON_INTERPRET unset)"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-6}


def _err(x, truth):
    return (x.double() - truth.double()).abs().max().item() if x.numel() else 0.0


def _hold(name, ours, truth, same):
    assert ours.shape == truth.shape and torch.isfinite(ours).all(), name
    err, ref = _err(ours, truth), _err(same, truth)
    assert err <= 2 * ref + FLOOR.get(ours.dtype, 0.0), f"{name}: error {err:.3e} > 2 x the reference's {ref:.3e}"


def _mask(kind, B, H, L, S, dtype):
    if kind == "bool":
        keep = torch.rand(B, 1, L, S) < 0.7
        keep[0, :, 0] = False  # a row with no key: 0
        return keep
    if kind == "float":
        return torch.zeros(B, H, 1, S, dtype=dtype).masked_fill(torch.rand(B, H, 1, S) < 0.3, float("-inf"))
    return None


# (B, Hq, Hk, L, S, E, Ev): one query per sequence, GQA groups packed into one tile, a few queries,
# awkward key counts and head dims
SHAPES = [
    (2, 4, 4, 1, 300, 64, 64),
    (1, 16, 1, 1, 257, 16, 16),
    (2, 8, 2, 2, 600, 59, 48),
    (3, 4, 2, 3, 1025, 80, 80),
]


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa_decode_shapes(dtype, shape, is_causal, mask):
    """The Triton attention forward hands decode shapes to the split-key kernels; the backward runs from
    their out and logsumexp as from the main kernel's."""
    B, Hq, Hk, L, S, E, Ev = shape
    assert decode.decode_shaped(Hq, Hk, L, S)
    q, k, v = torch.randn(B, Hq, L, E, dtype=dtype), torch.randn(B, Hk, S, E, dtype=dtype), torch.randn(B, Hk, S, Ev, dtype=dtype)
    m = _mask(mask, B, Hq, L, S, dtype)
    scale = 1 / math.sqrt(E)
    out, lse = attention_forward(q, k, v, m, is_causal, scale)
    ref_mask = None if m is None else (m if m.dtype == torch.bool else ~torch.isinf(m))
    kw = dict(is_causal=is_causal, enable_gqa=True, attn_mask=ref_mask)
    truth = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    same = reference.scaled_dot_product_attention(q, k, v, upcast=False, **kw)
    _hold("out", out, truth, same)
    # logsumexp against float64 (+inf for rows with no key)
    s = (q.double().repeat_interleave(1, 1) @ k.double().repeat_interleave(Hq // Hk, 1).transpose(-1, -2)) * scale
    if is_causal:
        s = s.masked_fill(~reference.causal_mask(L, S), float("-inf"))
    if ref_mask is not None:
        s = s.masked_fill(~ref_mask, float("-inf"))
    lse64 = torch.logsumexp(s, -1)
    dead = torch.isinf(lse64)
    assert torch.equal(torch.isinf(lse), dead) and (lse[dead] > 0).all()
    assert (lse.double() - lse64).masked_fill(dead, 0).abs().max() < 1e-4
    if dtype == torch.float32 and m is None:
        grads = attention_backward(torch.randn_like(out), q, k, v, out, lse, None, is_causal, scale)
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_cache_on_triton(dtype, monkeypatch):
    """ff.attention_with_kv_cache served by the Triton backend: the scatter append and the decode
    kernels with per-sequence lengths and bottom-right causality, decode and chunked steps."""
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "triton")
    B, Hq, Hk, S_max, E = 3, 8, 2, 300, 64
    for L, before in ((1, [0, 17, 298]), (5, [0, 100, 295])):
        q = torch.randn(B, Hq, L, E, dtype=dtype)
        kc, vc = torch.randn(B, Hk, S_max, E, dtype=dtype), torch.randn(B, Hk, S_max, E, dtype=dtype)
        k, v = torch.randn(B, Hk, L, E, dtype=dtype), torch.randn(B, Hk, L, E, dtype=dtype)
        lens = torch.tensor(before)
        assert ff.explain(ff.attention_with_kv_cache, q, kc, vc, k, v, cache_seqlens=lens).backend == "triton"
        kc64, vc64 = kc.double(), vc.double()
        truth = reference.attention_with_kv_cache(q.double(), kc64, vc64, k.double(), v.double(), lens)
        same = reference.attention_with_kv_cache(q, kc.clone(), vc.clone(), k, v, lens, upcast=False)
        out = ff.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=lens)
        _hold(f"out L={L}", out, truth, same)
        assert torch.equal(kc.double(), kc64) and torch.equal(vc.double(), vc64)
    with pytest.raises(ValueError, match="overflows"):
        kc0 = kc.clone()
        ff.attention_with_kv_cache(q, kc, vc, k, v, cache_seqlens=torch.tensor([0, 0, 296]))
    assert torch.equal(kc, kc0)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import warnings
    warnings.filterwarnings("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedformer.kernels import decode as D

    def compile_(kernel, pointers, constexprs, floats=("qk_scale",)):
        while not isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel = kernel.fn
        sig = {n: "constexpr" if n in constexprs else ("*" + pointers[n] if n in pointers else
               ("fp32" if n in floats else "i32")) for n in kernel.arg_names}
        binary = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 80, 32))
        assert binary.asm["cubin"], kernel.__name__

    bf = "bf16"
    for causal in (0, 1, 2):
        compile_(D._decode_partial_kernel,
                 dict(Q=bf, K=bf, V=bf, Mask=bf, SeqLens="i64", PartO="fp32", PartML="fp32"),
                 dict(HAS_LENS=True, HAS_MASK=True, MASK_IS_BOOL=False, CAUSAL=causal, INTERP_BF16=False, PRECISION="ieee",
                      BLOCK_M=16, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=64))
    compile_(D._decode_merge_kernel, dict(PartO="fp32", PartML="fp32", Out=bf, Lse="fp32"),
             dict(INTERP_BF16=False, BLOCK_M=16, BLOCK_S=8, BLOCK_DV=64))
    print("compiled")
    """
)


def test_decode_kernels_compile_for_gpu():
    """The interpreter runs Python, not GPU code: compile the bf16 decode kernels to sm_80 binaries."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
