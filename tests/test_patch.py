"""fusedformer.patch / unpatch (fusedformer.patching): torch.nn models and Hugging Face transformers models
(random weights, offline)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import fusedformer as ff
import fusedformer.nn as ffnn
import fusedformer.patching as ffpatch
from fusedformer.patching import PatchVerificationError, hf as ffpatch_hf, patch, unpatch, verify as ffpatch_verify
from tests.test_nn import assert_close, one_thread, padding_mask  # noqa: F401 (an autouse fixture)

D, H = 32, 4


def grads_match(model_a: nn.Module, model_b: nn.Module, tol: float = 2e-4) -> None:
    params_b = dict(model_b.named_parameters())
    for name, p in model_a.named_parameters():
        q = params_b[name]
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
        else:
            assert_close(f"grad of {name}", q.grad, p.grad, tol)


# ---- torch.nn models ----------------------------------------------------------------------------


class MyNorm(nn.LayerNorm):
    """A user subclass: it may override forward, so patch leaves it."""

    def forward(self, x):
        return super().forward(x) * 2


class ScaleNorm(nn.Module):
    """A normalisation fusedformer has no kernel for: patch leaves it and says why."""

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, activation="gelu", batch_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D))
        self.cross = nn.MultiheadAttention(D, H, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.act = nn.GELU(approximate="tanh")
        self.mine = MyNorm(D)
        self.rms = nn.RMSNorm(D)
        self.scale = ScaleNorm()

    def forward(self, x, memory, kpm):
        h = self.encoder(x, src_key_padding_mask=kpm)
        h = h + self.cross(h, memory, memory, need_weights=False)[0]
        return self.scale(self.rms(self.mine(self.act(self.norm(h)))))


def net_inputs(B=3, L=11, S=7):
    return torch.randn(B, L, D), torch.randn(B, S, D), padding_mask(B, L)


def test_patch_swaps_torch_modules_in_place():
    net = Net()
    twin = copy.deepcopy(net)
    ids = {name: id(m) for name, m in net.named_modules()}
    params = {name: p for name, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)  # built before patching

    report = patch(net)

    assert {name: id(m) for name, m in net.named_modules()} == ids  # same objects, new classes
    assert list(net.state_dict()) == list(twin.state_dict())
    assert all(p is params[name] for name, p in net.named_parameters())
    assert type(net.encoder) is ffnn.TransformerEncoder
    assert all(type(layer) is ffnn.TransformerEncoderLayer for layer in net.encoder.layers)
    assert type(net.encoder.layers[0].self_attn) is ffnn.MultiheadAttention
    assert type(net.cross) is ffnn.MultiheadAttention
    assert type(net.norm) is ffnn.LayerNorm and type(net.encoder.norm) is ffnn.LayerNorm
    assert type(net.act) is ffnn.GELU
    assert type(net.mine) is MyNorm and type(net.rms) is ffnn.RMSNorm
    assert report.replaced["TransformerEncoder"] == ["encoder"]
    assert report.replaced["TransformerEncoderLayer"] == ["encoder.layers.0", "encoder.layers.1"]
    assert sorted(report.replaced["MultiheadAttention"]) == [
        "cross",
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
    ]
    assert len(report.replaced["LayerNorm"]) == 6 and report.replaced["GELU"] == ["act"]
    assert report.replaced["RMSNorm"] == ["rms"]
    left = dict(report.left)
    assert "subclass of torch.nn.LayerNorm" in left["mine"]
    assert "no fused kernel" in left["scale"]

    x, memory, kpm = net_inputs()
    out, out_twin = net(x, memory, kpm), twin(x, memory, kpm)
    assert_close("output", out, out_twin, 5e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_twin.backward(grad)
    grads_match(twin, net)

    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    opt.step()  # the optimizer built on the torch modules trains the patched ones
    assert any(not torch.equal(before[name], p) for name, p in net.named_parameters())

    unpatch(net)
    assert (
        type(net.encoder) is nn.TransformerEncoder
        and type(net.encoder.layers[1].self_attn) is nn.MultiheadAttention
    )
    assert type(net.norm) is nn.LayerNorm and type(net.act) is nn.GELU and type(net.rms) is nn.RMSNorm
    assert not ffpatch.is_patched(net)


def test_patch_report_reads_well():
    report = patch(Net())
    text = str(report)
    assert text.startswith("fusedformer.patch: replaced 18 module(s), left 2")
    assert "Linear x4: encoder.layers.0.linear1, encoder.layers.0.linear2," in text
    assert "TransformerEncoderLayer x2: encoder.layers.0, encoder.layers.1" in text
    assert "left in place:" in text and "mine" in text and "scale" in text
    assert "need_weights" in text  # the note on MultiheadAttention's default


def test_patch_touches_that_instance_only():
    a, b = Net(), Net()
    forward = nn.LayerNorm.forward
    patch(a)
    assert type(b.norm) is nn.LayerNorm and type(b.encoder.layers[0]) is nn.TransformerEncoderLayer
    assert (
        nn.LayerNorm.forward is forward
        and nn.TransformerEncoderLayer.forward is not ffnn.TransformerEncoderLayer.forward
    )


def test_patch_twice_raises_and_unpatch_needs_a_patch():
    net = Net()
    patch(net)
    with pytest.raises(RuntimeError, match="already patched"):
        patch(net)
    unpatch(net)
    with pytest.raises(ValueError, match="not patched"):
        unpatch(net)


def test_patch_the_model_itself():
    layer = nn.TransformerDecoderLayer(D, H, 48, 0.0, batch_first=True)
    report = patch(layer, verify=True)
    assert (
        type(layer) is ffnn.TransformerDecoderLayer and type(layer.multihead_attn) is ffnn.MultiheadAttention
    )
    assert report.replaced["TransformerDecoderLayer"] == ["<model>"]
    unpatch(layer)
    assert type(layer) is nn.TransformerDecoderLayer and type(layer.norm3) is nn.LayerNorm


@pytest.mark.parametrize("kind", ["Transformer", "TransformerEncoder", "MultiheadAttention", "LayerNorm"])
def test_verify_builds_its_own_sample_for_torch_modules(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = {
            "Transformer": lambda: nn.Transformer(D, H, 1, 1, 48, 0.0),
            "TransformerEncoder": lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 48, 0.0), 2),
            "MultiheadAttention": lambda: nn.MultiheadAttention(D, H, kdim=11, vdim=13),
            "LayerNorm": lambda: nn.LayerNorm((3, D)),
        }[kind]()
    report = patch(model, verify=True)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert "verified" in str(report)


def test_verify_with_user_inputs_and_modes_kept():
    net = Net().train()
    report = patch(net, verify=True, sample_inputs=net_inputs())
    assert report.max_abs_diff < 1e-4
    assert all(m.training for m in net.modules())  # verify ran in eval mode and put the modes back


def test_verify_failure_raises_and_restores(monkeypatch):
    from fusedformer.nn import normalization

    monkeypatch.setattr(normalization, "layer_norm", lambda x, *args: x * 1.01)  # a broken kernel
    net = Net()
    with pytest.raises(PatchVerificationError, match=r"max \|diff\|"):
        patch(net, verify=True, sample_inputs=net_inputs())
    assert not ffpatch.is_patched(net)
    assert type(net.norm) is nn.LayerNorm and type(net.encoder) is nn.TransformerEncoder


def test_verify_compares_real_tokens_only():
    """With an ``attention_mask`` in the batch, outputs (B, L, ...) are compared at its real tokens: a
    difference at a padded position passes, the same difference at a real token fails."""
    before = [torch.zeros(2, 5, 3), torch.zeros(2)]
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padding = ffpatch_verify.padding({"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": attention_mask})
    after = [before[0].clone(), before[1].clone()]
    after[0][0, 4] = 1.0  # a padded position
    assert ffpatch_verify.compare(before, after, None, None, padding) == 0.0
    with pytest.raises(PatchVerificationError):
        ffpatch_verify.compare(before, after, None, None, None)  # without the mask, every position counts
    after[0][1, 4] = 1.0  # a real token (its 3 features)
    with pytest.raises(PatchVerificationError, match="at 3 element"):  # the real token's 3 values
        ffpatch_verify.compare(before, after, None, None, padding)


def test_verify_asks_for_inputs_it_cannot_build():
    with pytest.raises(ValueError, match="sample_inputs"):
        patch(Net(), verify=True)


# ---- Hugging Face transformers ------------------------------------------------------------------

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def hf_model(transformers, name: str) -> nn.Module:
    """A small model with random weights and no dropout, built from a config (nothing downloaded)."""
    t = transformers
    if name == "bert":
        config = t.BertConfig(
            vocab_size=99,
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=H,
            intermediate_size=37,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return t.BertModel(config)
    if name == "gpt2":
        config = t.GPT2Config(
            vocab_size=99,
            n_embd=D,
            n_layer=2,
            n_head=H,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        return t.GPT2LMHeadModel(config)
    if name == "bart":
        config = t.BartConfig(
            vocab_size=99,
            d_model=D,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=H,
            decoder_attention_heads=H,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            max_position_embeddings=64,
        )
        return t.BartForConditionalGeneration(config)
    if name == "t5":
        config = t.T5Config(
            vocab_size=99,
            d_model=D,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=H,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            feed_forward_proj="gated-gelu",
        )
        return t.T5ForConditionalGeneration(config)
    if name == "llama":  # grouped-query attention
        return decoder_lm(t, "llama")
    raise ValueError(name)


HF_MODELS = {  # name: (number of attention modules served, number of LayerNorms, GELU modules, RMSNorms)
    "bert": (2, 5, 2, 0),
    "gpt2": (2, 5, 2, 0),
    "bart": (6, 12, 4, 0),
    "t5": (6, 0, 4, 12),
    "llama": (2, 0, 0, 5),
}


def hf_batch(model, B=3, L=10, T=7, pad_side="right"):
    """Token ids with rows of different lengths (padding on ``pad_side``), and decoder ids if needed."""
    ids = torch.randint(4, model.config.vocab_size, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    for row, n_pad in enumerate([0, 3, 6][:B]):
        if n_pad:
            mask[row, -n_pad:] = 0 if pad_side == "right" else 1
            if pad_side == "left":
                mask[row, :n_pad] = 0
                mask[row, n_pad:] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(4, model.config.vocab_size, (B, T))
    return inputs


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_patch_matches_unpatched_forward_and_backward(transformers, name, monkeypatch):
    model = hf_model(transformers, name).train()
    twin = copy.deepcopy(model)
    calls = []
    real = ffpatch_hf.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append(attn_mask is not None)
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    report = patch(model, verify=True)
    n_attention, n_layer_norm, n_gelu, n_rms = HF_MODELS[name]
    assert len(report.replaced.get(ffpatch.HF_ATTENTION_KIND, [])) == n_attention
    assert len(report.replaced.get("LayerNorm", [])) == n_layer_norm
    assert sum(len(p) for k, p in report.replaced.items() if "GELU" in k) == n_gelu
    assert sum(len(p) for k, p in report.replaced.items() if "ff.rms_norm" in k) == n_rms
    assert len(report.replaced.get("Conv1D -> ff.linear (measured)", [])) == (8 if name == "gpt2" else 0)
    assert report.max_abs_diff < 1e-4

    monkeypatch.setattr(ffpatch_hf, "scaled_dot_product_attention", spy)
    batch = hf_batch(model)
    with warnings.catch_warnings():
        if (
            name == "t5"
        ):  # its learned position bias is a mask that requires grad: the reference path, by design
            warnings.simplefilter("ignore", ff.FallbackWarning)
        out, out_twin = main_output(model(**batch)), main_output(twin(**batch))
    assert len(calls) == n_attention, "the fused attention was not called by every attention module"
    assert any(calls), "the padding mask never reached the fused attention"
    valid = batch["attention_mask"].bool() if not model.config.is_encoder_decoder else slice(None)
    assert_close("output", out[valid], out_twin[valid], 5e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_twin.backward(grad)
    grads_match(twin, model)

    unpatch(model)
    assert model.config._attn_implementation == twin.config._attn_implementation == "sdpa"


# ---- Hugging Face RMSNorm classes ---------------------------------------------------------------


def decoder_lm(transformers, name: str) -> nn.Module:
    """A small decoder-only LM of a Llama-family architecture, random weights, from its config."""
    t = transformers
    config_cls, model_cls = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM),
        "mistral": (t.MistralConfig, t.MistralForCausalLM),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM),
    }[name]
    kwargs = dict(
        vocab_size=99,
        hidden_size=D,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if name == "gemma":
        kwargs["head_dim"] = D // H
    model = model_cls(config_cls(**kwargs))
    if name == "gemma":  # Gemma's norm weights start at 0 (1 + w = 1): give them values to test 1 + w
        with torch.no_grad():
            for m in model.modules():
                if type(m).__name__ == "GemmaRMSNorm":
                    m.weight.normal_()
    return model


def _profiled_ops(model, batch) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(**batch)
    return {e.key for e in prof.key_averages()}


RMS_CLASSES = {"llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm", "qwen2": "Qwen2RMSNorm", "gemma": "GemmaRMSNorm"}


@pytest.mark.parametrize("name", list(RMS_CLASSES))
def test_hf_llama_family_rms_norm_served_by_fusedformer(transformers, name):
    """Built from its config and patched: every RMSNorm runs fusedformer::rms_norm_fwd (the profiler sees
    it), the logits stay within 1e-4 in float32, and unpatch restores the classes and the numbers."""
    model = decoder_lm(transformers, name).eval()
    cls_name = RMS_CLASSES[name]
    norms = [m for m in model.modules() if type(m).__name__ == cls_name]
    assert len(norms) == 5  # 2 per layer, and the final norm
    original_cls = type(norms[0])
    batch = {k: v for k, v in hf_batch(model).items()}
    with torch.no_grad():
        before = model(**batch).logits
        assert "fusedformer::rms_norm_fwd" not in _profiled_ops(model, batch)

        report = patch(model, verify=True)
        assert len(report.replaced[f"{cls_name} -> ff.rms_norm"]) == 5
        assert f"{cls_name} -> ff.rms_norm x5" in str(report)
        assert all(type(m) is not original_cls and isinstance(m, original_cls) for m in norms)
        ops = _profiled_ops(model, batch)
        assert "fusedformer::rms_norm_fwd" in ops, sorted(o for o in ops if "fusedformer" in o)
        after = model(**batch).logits
        valid = batch["attention_mask"].bool()
        assert (after[valid] - before[valid]).abs().max().item() < 1e-4

        unpatch(model)
        assert all(type(m) is original_cls for m in norms)
        assert torch.equal(model(**batch).logits, before)


def test_hf_llama_rms_norm_gradients_through_fused_op(transformers):
    model = decoder_lm(transformers, "llama").train()
    twin = copy.deepcopy(model)
    patch(model)
    batch = hf_batch(model)
    out, out_twin = model(**batch).logits, twin(**batch).logits
    grad = torch.randn_like(out)
    out.backward(grad)
    out_twin.backward(grad)
    grads_match(twin, model)


@pytest.mark.parametrize("style,cls_path", [
    ("llama", ("llama", "modeling_llama", "LlamaRMSNorm")),
    ("gemma", ("gemma", "modeling_gemma", "GemmaRMSNorm")),
    ("t5", ("t5", "modeling_t5", "T5LayerNorm")),
])  # fmt: skip
@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")],
                         ids=lambda d: "x:" + d[0] + ",w:" + d[1])  # fmt: skip
def test_hf_rms_norm_classes_keep_their_dtype_handling(transformers, style, cls_path, dtypes):
    """Each class's own dtypes (Llama: fp32 statistics, cast back, then weight; Gemma: 1 + w in fp32; T5: a
    half weight's dtype): the same output dtype as the original, and values within a rounding of it."""
    import importlib

    module = importlib.import_module(f"transformers.models.{cls_path[0]}.{cls_path[1]}")
    x_dtype, w_dtype = (getattr(torch, d) for d in dtypes)
    norm = getattr(module, cls_path[2])(48).to(w_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48) * 0.5 + (0.0 if style == "gemma" else 1.0))
    x = torch.randn(3, 5, 48).to(x_dtype)
    expected = norm(x)
    report = patch(norm)
    assert report.num_replaced == 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = norm(x)
    assert "fusedformer::rms_norm_fwd" in {e.key for e in prof.key_averages()}
    assert got.dtype == expected.dtype
    tol = 1e-5 if got.dtype == torch.float32 and x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    unpatch(norm)
    assert type(norm) is getattr(module, cls_path[2])


def test_hf_t5_layer_norm_served_by_fused_rms_op(transformers):
    model = hf_model(transformers, "t5").eval()
    report = patch(model)
    assert len(report.replaced["T5LayerNorm -> ff.rms_norm"]) == 12
    batch = hf_batch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ff.FallbackWarning)
        with torch.no_grad():
            ops = _profiled_ops(model, batch)
    assert "fusedformer::rms_norm_fwd" in ops


def test_hf_padding_mask_takes_effect(transformers):
    """Without a mask the padded batch gives other numbers; patched, the mask reaches the fused attention."""
    model = hf_model(transformers, "bert").eval()
    batch = hf_batch(model)
    with torch.no_grad():
        masked = model(**batch).last_hidden_state
        unmasked = model(input_ids=batch["input_ids"]).last_hidden_state
        patch(model)
        masked_patched = model(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert not torch.allclose(masked[valid], unmasked[valid], atol=1e-3), (
        "padding changes nothing: cannot fail"
    )
    assert_close("masked output", masked_patched[valid], masked[valid], 5e-5)


def test_hf_patch_is_per_instance_even_with_a_shared_config(transformers):
    a = hf_model(transformers, "bert")
    b = transformers.BertModel(a.config)  # the very same config object
    config = a.config
    patch(a)
    assert a.config is not config and a.config._attn_implementation == "fusedformer"
    assert b.config is config and b.config._attn_implementation == "sdpa"
    assert type(b.embeddings.LayerNorm) is nn.LayerNorm
    assert a.encoder.layer[0].attention.self.config is a.config
    unpatch(a)
    assert a.config is config and a.encoder.layer[0].attention.self.config is config
    assert type(a.embeddings.LayerNorm) is nn.LayerNorm
    assert type(a.encoder.layer[0].intermediate.intermediate_act_fn).__name__ == "GELUActivation"


def test_hf_generate_gives_the_same_tokens(transformers):
    """Greedy decoding with a cache (one query per step) from a left-padded batch."""
    model = hf_model(transformers, "gpt2").eval()
    batch = hf_batch(model, pad_side="left")
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        before = model.generate(**batch, **kwargs)
        patch(model)
        after = model.generate(**batch, **kwargs)
    assert torch.equal(before, after)


GELU_KINDS = {  # ACT2FN key: replaced by ff.nn.GELU(approximate), or None = left
    "gelu": "none",
    "gelu_python": "none",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_accurate": "tanh",
    "quick_gelu": None,
    "gelu_10": None,
}


@pytest.mark.parametrize("key", list(GELU_KINDS))
def test_hf_gelu_activations(transformers, key):
    from transformers.activations import ACT2FN

    model = nn.Sequential(nn.Linear(8, 16), ACT2FN[key])
    x = torch.randn(5, 8) * 3
    before = model(x)
    report = patch(model)
    after = model(x)
    approximate = GELU_KINDS[key]
    if approximate is None:
        assert not isinstance(model[1], ffnn.GELU)
        assert [path for path, _ in report.left] == ["1"]
    else:
        assert type(model[1]) is ffnn.GELU and model[1].approximate == approximate
        assert_close("activation", after, before, 1e-5)
    unpatch(model)
    assert type(model[1]) is type(ACT2FN[key])


def _sdpa_cases():
    cases = []
    for mask in ["none", "bool", "float"]:
        for module_causal in [False, True]:
            for L in [1, 9]:
                cases.append((mask, module_causal, L, 1, False))
    cases += [("bool", True, 9, 2, False), ("none", True, 9, 2, False), ("none", False, 1, 2, False)]
    cases += [("none", True, 9, 1, True), ("bool", True, 9, 1, True), ("float", False, 9, 1, True)]
    return cases


@pytest.mark.parametrize("mask,module_causal,L,groups,position_bias", _sdpa_cases())
def test_hf_attention_function_matches_sdpa(transformers, mask, module_causal, L, groups, position_bias):
    """The "fusedformer" AttentionInterface entry against transformers' own sdpa entry, argument for argument."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = module_causal, groups, False
    B, Hq, S, E = 2, 4, 9, 8
    q = torch.randn(B, Hq, L, E, requires_grad=True)
    k = torch.randn(B, Hq // groups, S, E, requires_grad=True)
    v = torch.randn(B, Hq // groups, S, E, requires_grad=True)
    attention_mask = {
        "none": None,
        "bool": torch.rand(B, 1, L, S) > 0.3,
        "float": torch.randn(B, 1, L, S),
    }[mask]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask[..., 0] = True
    kwargs = {"position_bias": torch.randn(1, Hq, L, S, requires_grad=True)} if position_bias else {}
    theirs, _ = sdpa_attention_forward(module, q, k, v, attention_mask, dropout=0.0, scaling=0.3, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ff.FallbackWarning)  # a position bias that requires grad
        ours, weights = ffpatch_hf.fusedformer_attention_forward(
            module, q, k, v, attention_mask, dropout=0.0, scaling=0.3, **kwargs
        )
    assert weights is None and ours.shape == theirs.shape == (B, L, Hq, E)
    assert_close("output", ours, theirs, 5e-5)
    grad = torch.randn_like(ours)
    inputs = [q, k, v] + ([kwargs["position_bias"]] if position_bias else [])
    for name, a, b in zip(
        "qkvp", torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)
    ):
        assert_close(f"grad {name}", a, b, 2e-4)


def test_hf_attention_function_rejects_what_it_cannot_do(transformers):
    module = nn.Module()
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        ffpatch_hf.fusedformer_attention_forward(module, q, q, q, None, softcap=30.0)


def test_hf_sample_inputs_pad_a_row(transformers):
    model = hf_model(transformers, "bart")
    inputs = ffpatch.build_sample_inputs(model)
    assert set(inputs) == {"input_ids", "attention_mask", "decoder_input_ids"}
    assert (inputs["attention_mask"] == 0).any()


def test_public_api_exports():
    """``ff.patch`` / ``ff.unpatch`` and ``ff.nn`` are the public way in."""
    assert ff.patch is patch and ff.unpatch is unpatch
    assert ff.nn is ffnn
    # the module is fusedformer.patching (the function would shadow a module fusedformer.patch); the
    # old spelling `from fusedformer.patch import patch` still works
    from fusedformer.patch import patch as old_spelling

    assert old_spelling is patch and ff.patching is ffpatch
