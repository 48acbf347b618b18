"""fusedformer.nn against its torch.nn namesakes: outputs and every gradient, masks of every kind,
state_dicts both ways, the fused ops on the path, and a 20-step training run."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedformer as ff
import fusedformer.nn as ffnn
from fusedformer import backends, handover
from fusedformer.nn import attention as ff_attention

D, H = 32, 4  # model width and heads of the small modules below

# mixed bool/float masks are cases on purpose: torch supports them (with this deprecation warning)
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched:UserWarning")


# ---- helpers ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these modules are tiny, and on a loaded 2-core machine two OpenMP threads
    spinning against other processes make each small op up to 50x slower. (The kernels' own tests run
    multi-threaded.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def twins(torch_cls, fused_cls, *args, **kwargs):
    """A torch module and its fused twin holding the same weights (the fused one loads torch's state_dict)."""
    t = torch_cls(*args, **kwargs)
    f = fused_cls(*args, **kwargs)
    f.load_state_dict(t.state_dict())
    return t, f


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if o is not None]


def assert_close(name: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
    scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
    assert err <= tol * scale, f"{name}: max |diff| {err:.3e} > {tol:.0e} x {scale:.3g}"


def check_twins(
    t: nn.Module, f: nn.Module, *inputs, call=None, tol: float = 5e-5, grad_tol: float = 2e-4, **kwargs
):
    """Same outputs, same input gradients, same parameter gradients (by name) for ``t`` and ``f``.

    ``inputs`` are the float tensors that get gradients; ``kwargs`` go to both forwards as they are;
    ``call(module, *inputs)`` replaces ``module(*inputs, **kwargs)``.
    """
    call = call or (lambda m, *xs: m(*xs, **kwargs))
    leaves_t = [x.detach().clone().requires_grad_(True) for x in inputs]
    leaves_f = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs_t = _outputs(call(t, *leaves_t))
    outs_f = _outputs(call(f, *leaves_f))
    assert len(outs_t) == len(outs_f)
    grads = [torch.randn_like(o) for o in outs_t]
    for i, (ot, of) in enumerate(zip(outs_t, outs_f)):
        assert_close(f"output {i}", of, ot, tol)
    torch.autograd.backward(outs_t, grads)
    torch.autograd.backward(outs_f, grads)
    for i, (xt, xf) in enumerate(zip(leaves_t, leaves_f)):
        if xt.grad is not None or xf.grad is not None:
            assert_close(f"grad of input {i}", xf.grad, xt.grad, grad_tol)
    params_f = dict(f.named_parameters())
    for name, p in t.named_parameters():
        if p.grad is None:
            assert params_f[name].grad is None or not params_f[name].grad.any(), name
            continue
        assert_close(f"grad of {name}", params_f[name].grad, p.grad, grad_tol)
    return outs_f


def seq(B: int, L: int, width: int, batch_first: bool) -> torch.Tensor:
    return torch.randn(B, L, width) if batch_first else torch.randn(L, B, width)


def bool_mask(L: int, S: int, p: float = 0.3) -> torch.Tensor:
    """(L, S) bool, True = masked out (nn.MultiheadAttention's convention); key 0 always visible."""
    m = torch.rand(L, S) < p
    m[:, 0] = False
    return m


def float_mask(*shape: int) -> torch.Tensor:
    """Additive float mask with some -inf entries; key 0 always finite."""
    m = torch.randn(*shape)
    m = m.masked_fill(torch.rand(*shape) < 0.2, float("-inf"))
    m[..., 0] = 0.0
    return m


def padding_mask(B: int, S: int) -> torch.Tensor:
    """(B, S) bool, True = padding; the last row keeps only its first ~half, key 0 never padded."""
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[-1, max(1, S // 2 + 1) :] = True
    return kpm


def causal_bool(L: int) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool).triu(1)  # True above the diagonal = masked out


def make_masks(kind: str, B: int, L: int, S: int):
    """(attn_mask, key_padding_mask) in nn.MultiheadAttention's conventions."""
    kpm_bool = padding_mask(B, S)
    kpm_float = torch.zeros(B, S).masked_fill(kpm_bool, float("-inf"))
    return {
        "none": (None, None),
        "bool": (bool_mask(L, S), None),
        "float": (float_mask(L, S), None),
        "bool_per_head": (torch.stack([bool_mask(L, S) for _ in range(B * H)]), None),
        "float_per_head": (float_mask(B * H, L, S), None),
        "kpm_bool": (None, kpm_bool),
        "kpm_float": (None, kpm_float),
        "bool+kpm_bool": (bool_mask(L, S), kpm_bool),
        "float+kpm_float": (float_mask(L, S), kpm_float),
    }[kind]


@contextlib.contextmanager
def ignore_fallback():
    """The reference path is the point of the test (need_weights=True, dropout): its warning is expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ff.FallbackWarning)
        yield


# ---- LayerNorm, RMSNorm and GELU ----------------------------------------------------------------


@pytest.mark.parametrize("shape,ns", [((2, 17, D), (D,)), ((1, 1), (1,)), ((3, 5, 7, 97), (7, 97))])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_torch(shape, ns, affine, bias):
    t, f = twins(nn.LayerNorm, ffnn.LayerNorm, ns, eps=1e-5, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():  # not the trivial ones/zeros
            for p in t.parameters():
                p.normal_()
        f.load_state_dict(t.state_dict())
    check_twins(t, f, torch.randn(*shape) * 3 + 1)


@pytest.mark.parametrize("shape,ns", [((2, 17, D), (D,)), ((1, 1), (1,)), ((3, 5, 7, 97), (7, 97))])
@pytest.mark.parametrize("affine,eps", [(True, None), (True, 1e-3), (False, None)])
def test_rms_norm_matches_torch(shape, ns, affine, eps):
    t, f = twins(nn.RMSNorm, ffnn.RMSNorm, ns, eps=eps, elementwise_affine=affine)
    assert isinstance(f, nn.RMSNorm)
    if affine:
        with torch.no_grad():
            t.weight.normal_()
        f.load_state_dict(t.state_dict())
    check_twins(t, f, torch.randn(*shape) * 3 + 1)
    assert ff.explain(f, torch.randn(*shape)).backend == "cpp"


def test_rms_norm_mixed_dtype_casts_parameters():
    t, f = twins(nn.RMSNorm, ffnn.RMSNorm, D)
    x = torch.randn(4, D).bfloat16()
    assert f(x).dtype == torch.bfloat16
    assert_close("bf16 output", f(x).float(), t(x.float()).float(), 3e-2)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1,), (17, 97), (2, 3, 1025)])
def test_gelu_matches_torch(approximate, shape):
    check_twins(nn.GELU(approximate), ffnn.GELU(approximate), torch.randn(*shape) * 3)


def test_layer_norm_mixed_dtype_casts_parameters():
    """bf16 activations with fp32 parameters (as under autocast) work, as in torch."""
    t, f = twins(nn.LayerNorm, ffnn.LayerNorm, D)
    x = torch.randn(4, D).bfloat16()
    assert f(x).dtype == torch.bfloat16
    assert_close("bf16 output", f(x).float(), t(x).float(), 3e-2)


# ---- MultiheadAttention -------------------------------------------------------------------------

MASK_KINDS = [
    "none",
    "bool",
    "float",
    "bool_per_head",
    "float_per_head",
    "kpm_bool",
    "kpm_float",
    "bool+kpm_bool",
    "float+kpm_float",
]


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_masks_match_torch(mask_kind, need_weights, average, batch_first):
    B, L = 3, 17
    t, f = twins(nn.MultiheadAttention, ffnn.MultiheadAttention, D, H, batch_first=batch_first)
    attn_mask, kpm = make_masks(mask_kind, B, L, L)
    x = seq(B, L, D, batch_first)

    def call(m, q):
        return m(
            q,
            q,
            q,
            key_padding_mask=kpm,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average,
        )

    with ignore_fallback():
        outs = check_twins(t, f, x, call=call)
    if need_weights:
        assert outs[1].shape == ((B, L, L) if average else (B, H, L, L))


_SIZES = [(1, 1), (17, 17), (5, 97), (97, 3)]


@pytest.mark.parametrize(
    "kind,L,S",
    [(kind, L, S) for kind in ("self", "key_is_value", "separate", "kdim_vdim") for L, S in _SIZES
     if kind != "self" or L == S],  # self-attention has L == S
)
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_projections_and_sizes_match_torch(kind, L, S, batch_first):
    B = 2
    kdim, vdim = (11, 13) if kind == "kdim_vdim" else (D, D)
    t, f = twins(
        nn.MultiheadAttention, ffnn.MultiheadAttention, D, H, kdim=kdim, vdim=vdim, batch_first=batch_first
    )
    q, k, v = seq(B, L, D, batch_first), seq(B, S, kdim, batch_first), seq(B, S, vdim, batch_first)
    kpm = padding_mask(B, S)
    if kind == "self":
        check_twins(t, f, q, call=lambda m, x: m(x, x, x, key_padding_mask=kpm, need_weights=False))
    elif kind == "key_is_value":
        check_twins(t, f, q, k, call=lambda m, x, kv: m(x, kv, kv, key_padding_mask=kpm, need_weights=False))
    else:
        check_twins(t, f, q, k, v, call=lambda m, *qkv: m(*qkv, key_padding_mask=kpm, need_weights=False))


@pytest.mark.parametrize(
    "option", ["bias=False", "add_bias_kv", "add_zero_attn", "add_bias_kv+add_zero_attn"]
)
@pytest.mark.parametrize("mask_kind", ["none", "bool+kpm_bool", "float+kpm_float"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_options_match_torch(option, mask_kind, need_weights):
    B, L = 2, 9
    kwargs = {
        "bias=False": {"bias": False},
        "add_bias_kv": {"add_bias_kv": True},
        "add_zero_attn": {"add_zero_attn": True},
        "add_bias_kv+add_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    }[option]
    t, f = twins(nn.MultiheadAttention, ffnn.MultiheadAttention, D, H, batch_first=True, **kwargs)
    attn_mask, kpm = make_masks(mask_kind, B, L, L)
    with ignore_fallback():
        check_twins(
            t,
            f,
            torch.randn(B, L, D),
            call=lambda m, x: m(
                x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights
            ),
        )


@pytest.mark.parametrize("mask_kind", ["none", "float", "float_per_head", "kpm_bool"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_unbatched_matches_torch(mask_kind, need_weights):
    L = 7
    t, f = twins(nn.MultiheadAttention, ffnn.MultiheadAttention, D, H)
    attn_mask, kpm = make_masks(mask_kind, 1, L, L)
    attn_mask = attn_mask[:H] if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
    kpm = kpm[0] if kpm is not None else None
    with ignore_fallback():
        outs = check_twins(
            t,
            f,
            torch.randn(L, D),
            call=lambda m, x: m(
                x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights
            ),
        )
    assert outs[0].shape == (L, D)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_is_causal_matches_torch(mask_dtype, with_kpm, need_weights):
    B, L = 2, 17
    t, f = twins(nn.MultiheadAttention, ffnn.MultiheadAttention, D, H, batch_first=True)
    attn_mask = causal_bool(L)
    if mask_dtype != torch.bool:
        attn_mask = nn.Transformer.generate_square_subsequent_mask(L)
    kpm = padding_mask(B, L) if with_kpm else None
    if kpm is not None and mask_dtype != torch.bool:
        kpm = torch.zeros(B, L).masked_fill(kpm, float("-inf"))

    def call(m, x):
        return m(
            x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights, is_causal=True
        )

    with ignore_fallback():
        check_twins(t, f, torch.randn(B, L, D), call=call)


def test_mha_is_causal_without_mask_is_the_causal_mask():
    """An extension: torch demands attn_mask with is_causal; fusedformer applies the causal mask without one."""
    B, L = 2, 13
    t, f = twins(nn.MultiheadAttention, ffnn.MultiheadAttention, D, H, batch_first=True)
    x = torch.randn(B, L, D)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        t(x, x, x, need_weights=False, is_causal=True)
    ours = f(x, x, x, need_weights=False, is_causal=True)[0]
    theirs = t(x, x, x, need_weights=False, attn_mask=causal_bool(L))[0]
    assert_close("causal output", ours, theirs, 5e-5)


def test_mha_fully_masked_rows_give_zero():
    """A query whose keys are all masked out gives 0, as torch's SDPA path does (its need_weights path gives NaN)."""
    B, L = 2, 5
    t, f = twins(nn.MultiheadAttention, ffnn.MultiheadAttention, D, H, batch_first=True)
    attn_mask = torch.zeros(L, L, dtype=torch.bool)
    attn_mask[2] = True  # query 2 sees nothing
    x = torch.randn(B, L, D, requires_grad=True)
    ours = f(x, x, x, attn_mask=attn_mask, need_weights=False)[0]
    theirs = t(x, x, x, attn_mask=attn_mask, need_weights=False)[0]
    assert_close("output", ours, theirs, 5e-5)
    with ignore_fallback():
        out_w, weights = f(x, x, x, attn_mask=attn_mask, need_weights=True)
    assert torch.isfinite(out_w).all() and (weights[:, 2] == 0).all()
    out_w.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_mha_rejects_bad_masks():
    f = ffnn.MultiheadAttention(D, H, batch_first=True)
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match="attn_mask"):
        f(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool), need_weights=False)
    with pytest.raises(ValueError, match="key_padding_mask"):
        f(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool), need_weights=False)
    with pytest.raises(TypeError, match="key_padding_mask"):
        f(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long), need_weights=False)
    with pytest.raises(ValueError, match="embed_dim"):
        f(torch.randn(2, 5, D + 1), x, x, need_weights=False)


def test_mha_key_padding_mask_is_a_b11s_mask(monkeypatch):
    """A key-padding mask reaches the fused call as a (B, 1, 1, S) view, never as a dense (B, 1, L, S) mask."""
    seen = []
    real = ff_attention.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(None if attn_mask is None else tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(ff_attention, "scaled_dot_product_attention", spy)
    f = ffnn.MultiheadAttention(D, H, batch_first=True)
    x = torch.randn(3, 11, D)
    with ignore_fallback():
        f(x, x, x, key_padding_mask=padding_mask(3, 11), need_weights=False)
        f(
            x,
            x,
            x,
            key_padding_mask=padding_mask(3, 11),
            attn_mask=causal_bool(11),
            is_causal=True,
            need_weights=False,
        )
        f(x, x, x, attn_mask=causal_bool(11), is_causal=True, need_weights=False)
    assert seen == [(3, 1, 1, 11), (3, 1, 1, 11), None]


# ---- attention dropout and explain --------------------------------------------------------------


def test_mha_dropout_with_weights_is_torchs_dropout():
    """need_weights=True runs on the reference path, which draws the very mask torch draws."""
    t, f = twins(nn.MultiheadAttention, ffnn.MultiheadAttention, D, H, dropout=0.5, batch_first=True)
    x = torch.randn(2, 7, D)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    theirs, w_theirs = t(x, x, x, need_weights=True, average_attn_weights=False)
    torch.manual_seed(seed)
    with ignore_fallback():
        ours, w_ours = f(x, x, x, need_weights=True, average_attn_weights=False)
    assert_close("output with dropout", ours, theirs, 5e-5)
    assert_close("weights with dropout", w_ours, w_theirs, 5e-5)
    no_dropout = f.eval()(x, x, x, need_weights=False)[0]
    assert not torch.allclose(ours, no_dropout), "dropout changed nothing: the test cannot fail"


def test_mha_fused_dropout_applies_the_kernels_mask(monkeypatch):
    """need_weights=False: the fused dropout, whose mask (not torch's draw) the reference reproduces."""
    from fusedformer import reference
    from fusedformer.ops import attention as ops_attention

    seed, p = 424242, 0.5
    monkeypatch.setattr(ops_attention, "_dropout_seed", lambda: torch.tensor(seed))
    t, f = twins(nn.MultiheadAttention, ffnn.MultiheadAttention, D, H, dropout=p, batch_first=True)
    B, L = 2, 7
    x = torch.randn(B, L, D, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused: no fallback warning
        ours = f(x, x, x, need_weights=False)[0]
    keep = ops_attention.attention_dropout_mask(B, H, L, L, p, seed)  # (B, H, L, L)

    def heads(y):  # (B, L, D) -> (B, H, L, D / H)
        return y.reshape(B, L, H, D // H).transpose(1, 2)

    q, k, v = F.linear(x, t.in_proj_weight, t.in_proj_bias).chunk(3, dim=-1)
    y = reference.scaled_dot_product_attention(heads(q), heads(k), heads(v), dropout_p=p, dropout_mask=keep)
    theirs = F.linear(y.transpose(1, 2).flatten(2), t.out_proj.weight, t.out_proj.bias)
    assert_close("output with the kernels' dropout mask", ours, theirs, 5e-5)
    g_ours, = torch.autograd.grad(ours.square().sum(), x)
    g_theirs, = torch.autograd.grad(theirs.square().sum(), x)
    assert_close("input gradient with the kernels' dropout mask", g_ours, g_theirs, 2e-4)
    no_dropout = f.eval()(x, x, x, need_weights=False)[0]
    assert not torch.allclose(ours, no_dropout), "dropout changed nothing: the test cannot fail"


def test_mha_dropout_is_fused_and_explain_says_so(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    f = ffnn.MultiheadAttention(D, H, dropout=0.1, batch_first=True)
    x = torch.randn(2, 7, D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(x, x, x, need_weights=False)
    e = f.explain(x, x, x, need_weights=False)
    assert e.backend == "cpp"
    assert not any("dropout" in why for why in e.reasons["cpp"])
    assert not any("dropout" in why for why in e.reasons["triton"])  # fused on Triton too
    f.eval()  # no dropout in eval: the same call as the functional one
    e = f.explain(x, x, x, need_weights=False)
    q = torch.randn(2, H, 7, D // H)
    assert e.backend == ff.explain(ff.scaled_dot_product_attention, q, q, q).backend
    assert not any("dropout" in why for why in e.reasons["cpp"])


def test_mha_need_weights_warns_and_explain_says_so(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    f = ffnn.MultiheadAttention(D, H, batch_first=True).eval()
    x = torch.randn(2, 7, D)
    with pytest.warns(ff.FallbackWarning, match="need_weights"):
        f(x, x, x)  # torch's default need_weights=True
    e = f.explain(x, x, x)
    assert e.backend == "reference"
    assert any("need_weights" in why for why in e.reasons["cpp"])
    assert "need_weights" in str(e)


def test_ff_explain_takes_the_modules():
    """``ff.explain(module, *forward_args)`` delegates to the module's ``.explain``."""
    f = ffnn.MultiheadAttention(D, H, batch_first=True)
    x = torch.randn(2, 7, D)
    e = ff.explain(f, x, x, x, need_weights=True)
    assert e.backend == "reference" and "need_weights" in str(e)
    assert ff.explain(ffnn.LayerNorm(D), x).backend == ffnn.LayerNorm(D).explain(x).backend


def test_mha_need_weights_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("FUSEDFORMER_STRICT", "1")
    f = ffnn.MultiheadAttention(D, H, batch_first=True)
    x = torch.randn(2, 7, D)
    with pytest.raises(ff.BackendUnavailableError, match="need_weights"):
        f(x, x, x, need_weights=True)


# ---- layers -------------------------------------------------------------------------------------

ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh_module": nn.GELU(approximate="tanh"),
    "callable": F.silu,
}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_matches_torch(activation, norm_first, batch_first):
    B, L = 3, 17
    t, f = twins(
        nn.TransformerEncoderLayer,
        ffnn.TransformerEncoderLayer,
        D,
        H,
        dim_feedforward=48,
        dropout=0.0,
        activation=ACTIVATIONS[activation],
        norm_first=norm_first,
        batch_first=batch_first,
    )
    kpm = padding_mask(B, L)
    check_twins(
        t, f, seq(B, L, D, batch_first), src_mask=causal_bool(L), src_key_padding_mask=kpm, is_causal=True
    )


@pytest.mark.parametrize(
    "mask_kind", ["none", "bool", "float", "bool_per_head", "kpm_bool", "float+kpm_float"]
)
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad"])
def test_encoder_layer_masks_and_modes_match_torch(mask_kind, mode):
    """Includes eval without grad, where torch takes its inference fast path and fusedformer does not."""
    B, L = 3, 17
    t, f = twins(
        nn.TransformerEncoderLayer, ffnn.TransformerEncoderLayer, D, H, 48, dropout=0.0, batch_first=True
    )
    attn_mask, kpm = make_masks(mask_kind, B, L, L)
    x = torch.randn(B, L, D)
    if mode != "train":
        t.eval(), f.eval()
    if mode == "eval_no_grad":
        theirs = t(x.clone().requires_grad_(), attn_mask, kpm).detach()  # torch's ordinary path
        with torch.no_grad():
            ours, theirs_fast = f(x, attn_mask, kpm), t(x, attn_mask, kpm)
        assert_close("output", ours, theirs, 5e-5)
        # NOTE [2026-11-23]: torch 2.13's inference fast path (_transformer_encoder_layer_fwd) disagrees with
        # its own ordinary path for float attention masks (even NaN for finite ones); elsewhere it agrees.
        if attn_mask is None or attn_mask.dtype == torch.bool:
            assert_close("output vs torch's fast path", ours, theirs_fast, 5e-5)
    else:
        check_twins(t, f, x, src_mask=attn_mask, src_key_padding_mask=kpm)


@pytest.mark.parametrize("L", [1, 97])
@pytest.mark.parametrize("bias", [True, False])
def test_encoder_layer_sizes_and_bias_match_torch(L, bias):
    t, f = twins(nn.TransformerEncoderLayer, ffnn.TransformerEncoderLayer, D, H, 48, 0.0, "gelu", bias=bias)
    check_twins(t, f, torch.randn(L, 2, D), src_key_padding_mask=padding_mask(2, L))


def test_encoder_layer_unbatched_matches_torch():
    t, f = twins(
        nn.TransformerEncoderLayer, ffnn.TransformerEncoderLayer, D, H, 48, 0.0, "gelu", batch_first=True
    )
    out = check_twins(t, f, torch.randn(9, D), src_mask=bool_mask(9, 9))
    assert out[0].shape == (9, D)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_under_autocast_matches_torch(norm_first):
    """bf16 autocast: F.linear runs in bf16, the fused ops take the activations' dtype (weights cast)."""
    t, f = twins(
        nn.TransformerEncoderLayer, ffnn.TransformerEncoderLayer, D, H, 48, 0.0, "gelu", batch_first=True,
        norm_first=norm_first,
    )  # fmt: skip
    x = torch.randn(2, 9, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = (
            f(x, src_key_padding_mask=padding_mask(2, 9)),
            t(x, src_key_padding_mask=padding_mask(2, 9)),
        )
        ours.float().sum().backward()
    assert ours.dtype == theirs.dtype
    assert_close("output", ours.float(), theirs.float(), 3e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in f.parameters())


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_decoder_layer_matches_torch(activation, norm_first, batch_first):
    B, T, S = 3, 11, 17
    t, f = twins(
        nn.TransformerDecoderLayer,
        ffnn.TransformerDecoderLayer,
        D,
        H,
        dim_feedforward=48,
        dropout=0.0,
        activation=ACTIVATIONS[activation],
        norm_first=norm_first,
        batch_first=batch_first,
    )
    check_twins(
        t,
        f,
        seq(B, T, D, batch_first),
        seq(B, S, D, batch_first),
        tgt_mask=causal_bool(T),
        tgt_is_causal=True,
        tgt_key_padding_mask=padding_mask(B, T),
        memory_key_padding_mask=padding_mask(B, S),
    )


@pytest.mark.parametrize("T,S", [(1, 1), (1, 97), (97, 5)])
@pytest.mark.parametrize("memory_mask_kind", ["none", "bool", "float", "float_per_head"])
def test_decoder_layer_memory_masks_match_torch(T, S, memory_mask_kind):
    B = 2
    t, f = twins(
        nn.TransformerDecoderLayer, ffnn.TransformerDecoderLayer, D, H, 48, 0.0, "gelu", batch_first=True
    )
    memory_mask, _ = make_masks(memory_mask_kind, B, T, S)
    check_twins(
        t,
        f,
        torch.randn(B, T, D),
        torch.randn(B, S, D),
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
        memory_mask=memory_mask,
        memory_key_padding_mask=padding_mask(B, S),
    )


def test_decoder_layer_memory_is_causal_matches_torch():
    B, T = 2, 9
    t, f = twins(nn.TransformerDecoderLayer, ffnn.TransformerDecoderLayer, D, H, 48, 0.0, batch_first=True)
    check_twins(
        t,
        f,
        torch.randn(B, T, D),
        torch.randn(B, T, D),
        tgt_mask=causal_bool(T),
        memory_mask=causal_bool(T),
        tgt_is_causal=True,
        memory_is_causal=True,
    )


# ---- stacks -------------------------------------------------------------------------------------


def encoder_twins(batch_first=True, norm_first=False, num_layers=2):
    layer = nn.TransformerEncoderLayer(D, H, 48, 0.0, "gelu", batch_first=batch_first, norm_first=norm_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "enable_nested_tensor is True, but ..."
        t = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(D))
        f = ffnn.TransformerEncoder(
            ffnn.TransformerEncoderLayer(
                D, H, 48, 0.0, "gelu", batch_first=batch_first, norm_first=norm_first
            ),
            num_layers,
            norm=ffnn.LayerNorm(D),
        )
    f.load_state_dict(t.state_dict())
    return t, f


@pytest.mark.parametrize(
    "mask", ["none", "causal_float_detected", "causal_bool_detected", "kpm", "float+kpm"]
)
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_matches_torch(mask, batch_first):
    B, L = 3, 17
    t, f = encoder_twins(batch_first)
    kwargs = {
        "none": {},
        "causal_float_detected": {"mask": nn.Transformer.generate_square_subsequent_mask(L)},
        "causal_bool_detected": {"mask": causal_bool(L)},
        "kpm": {"src_key_padding_mask": padding_mask(B, L)},
        "float+kpm": {"mask": float_mask(L, L), "src_key_padding_mask": padding_mask(B, L)},
    }[mask]
    check_twins(t, f, seq(B, L, D, batch_first), **kwargs)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_encoder_inference_zeroes_padding_as_torch_does():
    """torch's eval/no-grad path runs nested tensors and writes zeros at padded positions; so does fusedformer."""
    B, L = 3, 17
    t, f = encoder_twins(batch_first=True)
    t.eval(), f.eval()
    x, kpm = torch.randn(B, L, D), padding_mask(B, L)
    with torch.no_grad():
        theirs, ours = t(x, src_key_padding_mask=kpm), f(x, src_key_padding_mask=kpm)
    padded_value = t.norm(torch.zeros(D))  # the final norm of a zero vector
    assert torch.allclose(theirs[kpm], padded_value.expand(int(kpm.sum()), D)), "torch took no nested path"
    assert_close("output", ours, theirs, 5e-5)


def test_causal_mask_is_detected_not_built(monkeypatch):
    """The stacks detect torch's causal mask and pass is_causal, so no mask reaches the fused call."""
    seen = []
    real = ff_attention.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        seen.append((attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(ff_attention, "scaled_dot_product_attention", spy)
    _, f = encoder_twins()
    with ignore_fallback():
        f(torch.randn(2, 9, D), mask=nn.Transformer.generate_square_subsequent_mask(9))
    assert seen == [(True, True), (True, True)]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_matches_torch(batch_first, norm_first):
    B, S, T = 3, 13, 9
    kwargs = {
        "d_model": D,
        "nhead": H,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "dim_feedforward": 48,
        "dropout": 0.0,
        "activation": "gelu",
        "batch_first": batch_first,
        "norm_first": norm_first,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t, f = twins(nn.Transformer, ffnn.Transformer, **kwargs)
    src_kpm, tgt_kpm = padding_mask(B, S), padding_mask(B, T)
    check_twins(
        t,
        f,
        seq(B, S, D, batch_first),
        seq(B, T, D, batch_first),
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
        src_key_padding_mask=src_kpm,
        tgt_key_padding_mask=tgt_kpm,
        memory_key_padding_mask=src_kpm,
    )


# ---- construction, state_dicts, representation --------------------------------------------------


def _all_twins():
    layer_args = (D, H, 48, 0.0)
    return [
        (nn.LayerNorm, ffnn.LayerNorm, (D,), {}),
        (nn.RMSNorm, ffnn.RMSNorm, (D,), {"eps": 1e-6}),
        (nn.GELU, ffnn.GELU, (), {"approximate": "tanh"}),
        (
            nn.MultiheadAttention,
            ffnn.MultiheadAttention,
            (D, H),
            {"kdim": 11, "vdim": 13, "add_bias_kv": True},
        ),
        (nn.TransformerEncoderLayer, ffnn.TransformerEncoderLayer, layer_args, {"norm_first": True}),
        (nn.TransformerDecoderLayer, ffnn.TransformerDecoderLayer, layer_args, {"bias": False}),
        (nn.Transformer, ffnn.Transformer, (D, H, 2, 1, 48), {"batch_first": True}),
    ]


@pytest.mark.parametrize("torch_cls,fused_cls,args,kwargs", _all_twins())
def test_same_seed_same_weights_and_state_dict_both_ways(torch_cls, fused_cls, args, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(7)
        t = torch_cls(*args, **kwargs)
        torch.manual_seed(7)
        f = fused_cls(*args, **kwargs)
        other = torch_cls(*args, **kwargs)
    assert isinstance(f, torch_cls)
    sd_t, sd_f = t.state_dict(), f.state_dict()
    assert list(sd_t) == list(sd_f)
    assert all(torch.equal(sd_t[k], sd_f[k]) for k in sd_t)
    # torch -> fused -> torch: load a differently initialised torch module from the fused one
    if sd_t:
        with torch.no_grad():
            for p in f.parameters():
                p.add_(torch.randn_like(p))
        other.load_state_dict(f.state_dict())
        assert all(torch.equal(other.state_dict()[k], f.state_dict()[k]) for k in sd_f)
        f2 = fused_cls(*args, **kwargs)
        f2.load_state_dict(other.state_dict(), strict=True)


@pytest.mark.parametrize("torch_cls,fused_cls,args,kwargs", _all_twins())
def test_every_module_has_a_docstring_with_shapes_and_an_extra_repr(torch_cls, fused_cls, args, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        f = fused_cls(*args, **kwargs)
    assert fused_cls.__doc__ and fused_cls.__doc__ != torch_cls.__doc__
    assert "(" in fused_cls.__doc__ and ("Shape" in fused_cls.__doc__ or "Forward" in fused_cls.__doc__)
    assert f.extra_repr()
    assert type(f).__name__ in repr(f)


def test_modules_convert_torch_submodules():
    """A torch layer handed to ff.nn.TransformerEncoder is copied into fused layers (as torch copies it)."""
    torch_layer = nn.TransformerEncoderLayer(D, H, 48, 0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        f = ffnn.TransformerEncoder(torch_layer, 2, norm=nn.LayerNorm(D))
    assert type(torch_layer) is nn.TransformerEncoderLayer  # the argument itself is untouched
    assert all(type(layer) is ffnn.TransformerEncoderLayer for layer in f.layers)
    assert all(type(layer.self_attn) is ffnn.MultiheadAttention for layer in f.layers)
    assert type(f.norm) is ffnn.LayerNorm


# ---- the path runs through the fused ops, in training and in inference --------------------------


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ops_of(fn) -> set[str]:
    with _OpLog() as log:
        fn()
    return log.ops


def _fused_in_this_build() -> set[str]:
    """The op families that a fused kernel serves on CPU float32 in this build (ff.explain says "cpp")."""
    x, q = torch.randn(4, 8), torch.randn(1, 1, 4, 8)
    explained = {
        "attention": ff.explain(ff.scaled_dot_product_attention, q, q, q),
        "layer_norm": ff.explain(ff.layer_norm, x, (8,)),
        "add_layer_norm": ff.explain(ff.add_layer_norm, x, x, (8,)),
        "gelu": ff.explain(ff.gelu, x),
    }
    return {op for op, e in explained.items() if e.backend == "cpp"}


@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_run_through_the_fused_ops(mode, norm_first):
    t_layer = nn.TransformerDecoderLayer(D, H, 48, 0.0, "gelu", batch_first=True, norm_first=norm_first)
    f_enc = ffnn.TransformerEncoderLayer(D, H, 48, 0.0, "gelu", batch_first=True, norm_first=norm_first)
    f_dec = ffnn.TransformerDecoderLayer(D, H, 48, 0.0, "gelu", batch_first=True, norm_first=norm_first)
    f_dec.load_state_dict(t_layer.state_dict())
    x, mem = torch.randn(2, 9, D, requires_grad=True), torch.randn(2, 7, D)

    def run():
        out = f_dec(f_enc(x), mem)
        if mode == "train":
            out.sum().backward()

    if mode == "train":
        ops = _ops_of(run)
    else:
        f_enc.eval(), f_dec.eval()
        # handover off: at these sizes a no-grad LayerNorm or GELU may go to torch's kernel where that
        # measured faster on this machine (tests/test_handover.py); here the wiring to the fused ops is tested
        with torch.no_grad(), handover.off():
            ops = _ops_of(run)
    fused = _fused_in_this_build()
    # built with these kernels: the test cannot pass vacuously
    assert {"layer_norm", "add_layer_norm", "gelu"} <= fused
    if not norm_first:  # every norm follows a residual add: all of them are add + norm
        fused.discard("layer_norm")
    passes = ("fwd", "bwd") if mode == "train" else ("fwd",)
    must = {f"fusedformer.{op}_{p}" for op in fused for p in passes}
    assert must <= ops, f"missing fused ops: {must - ops}"
    never = {
        "aten._transformer_encoder_layer_fwd",
        "aten._native_multi_head_attention",
        "aten.native_layer_norm",
        "aten.gelu",
        "aten.layer_norm",
    }
    assert not (never & ops), f"torch ops on the path: {never & ops}"


# ---- training -----------------------------------------------------------------------------------


class Seq2Seq(nn.Module):
    """Token embeddings, a Transformer (torch's or fusedformer's), a vocabulary head."""

    def __init__(self, transformer_cls, vocab=23, d_model=D):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.transformer = transformer_cls(
            d_model,
            H,
            num_encoder_layers=1,
            num_decoder_layers=1,
            dim_feedforward=48,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
        )
        self.head = nn.Linear(d_model, vocab)

    def forward(self, src, tgt, src_kpm):
        T = tgt.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(T)
        y = self.transformer(
            self.embed(src),
            self.embed(tgt),
            tgt_mask=causal,
            tgt_is_causal=True,
            src_key_padding_mask=src_kpm,
            memory_key_padding_mask=src_kpm,
        )
        return self.head(y)  # (B, T, vocab)


def test_encoder_decoder_trains_like_torch():
    """Same initial weights, dropout 0: the same loss after each of 20 Adam steps (within 1e-4 relative)."""
    vocab, B, S, T = 23, 4, 11, 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t, f = Seq2Seq(nn.Transformer), Seq2Seq(ffnn.Transformer)
    f.load_state_dict(t.state_dict())
    opt_t, opt_f = torch.optim.Adam(t.parameters(), lr=3e-3), torch.optim.Adam(f.parameters(), lr=3e-3)
    src, tgt = torch.randint(0, vocab, (B, S)), torch.randint(0, vocab, (B, T + 1))
    kpm = padding_mask(B, S)
    losses = []
    for _ in range(20):
        step = []
        for model, opt in ((t, opt_t), (f, opt_f)):
            logits = model(src, tgt[:, :-1], kpm)
            loss = F.cross_entropy(logits.reshape(-1, vocab), tgt[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step.append(loss.item())
        losses.append(step)
    for i, (lt, lf) in enumerate(losses):
        assert abs(lf - lt) <= 1e-4 * abs(lt), f"step {i}: torch {lt:.6f} vs fused {lf:.6f}"
    assert losses[-1][0] < 0.7 * losses[0][0], "the model did not learn: the test cannot fail"
