"""Generation with a patched Hugging Face model: the same tokens as transformers' "sdpa" with its default
DynamicCache and with a StaticCache, GPT-2 (multi-head) and Llama (grouped-query), served by the fused
attention (the decode kernel for the one-query steps) with no fallback. Models are built from configs
with random weights: nothing is downloaded."""

from __future__ import annotations

import copy

import pytest
import torch

import fusedformer as ff

transformers = pytest.importorskip("transformers")


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=120, n_embd=64, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def llama():
    config = transformers.LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def batch(vocab: int, B: int = 3, L: int = 70):
    """Left-padded prompts of different lengths (generation pads on the left)."""
    ids = torch.randint(4, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    for row, n_pad in enumerate([0, 9, 40][:B]):
        mask[row, :n_pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama-gqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
def test_generate_gives_the_same_tokens(make, cache, padded, monkeypatch):
    model = make()
    patched = copy.deepcopy(model)
    ff.patch(patched)
    inputs = batch(model.config.vocab_size)
    if not padded:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    kwargs = {"max_new_tokens": 40, "min_new_tokens": 40, "do_sample": False, "pad_token_id": 0}
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    monkeypatch.setenv("FUSEDFORMER_STRICT", "1")  # a fallback to the reference path raises
    with torch.no_grad():
        before = model.generate(**inputs, **kwargs)
        with torch.profiler.profile(record_shapes=True) as prof:
            after = patched.generate(**inputs, **kwargs)
    # the query's L of every fused attention call: 1 in a decode step
    calls = [e.input_shapes[0][2] for e in prof.events() if e.name == "fusedformer::attention_fwd"]
    assert before.shape == (3, 70 + 40)
    assert torch.equal(before, after)
    layers = model.config.num_hidden_layers
    assert calls.count(1) == 39 * layers, f"decode steps served by the fused op: {calls.count(1)} of {39 * layers}"
