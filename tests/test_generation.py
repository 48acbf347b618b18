"""Generation with a patched Hugging Face model: the same tokens as transformers' "sdpa" with its default
DynamicCache and with a StaticCache, GPT-2 (multi-head) and Llama (grouped-query), served by the fused
attention (the decode kernel for the one-query steps) with no fallback. Models are built from configs
with random weights: nothing is downloaded."""

from __future__ import annotations

import copy

import pytest
import torch

import fusedformer as ff
from fusedformer import handover

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
    # every call on the fused kernels (this model's tiny calls might measure faster on torch's SDPA:
    # fusedformer.handover; test_generate_with_the_handover_gives_the_same_tokens covers that road)
    monkeypatch.setenv("FUSEDFORMER_HANDOVER", "0")
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


@pytest.mark.parametrize("torch_serves", [True, False], ids=["torch-serves", "fused-serves"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
def test_generate_with_the_handover_gives_the_same_tokens(padded, torch_serves, monkeypatch):
    """Small inference attention calls may be handed to torch's SDPA by measurement (fusedformer.handover);
    the verdict fixed each way, generation gives the unpatched model's tokens, and the verdict decides
    who serves the decode steps (calls with a mask and is_causal together never reach torch's)."""
    monkeypatch.delenv("FUSEDFORMER_HANDOVER", raising=False)
    monkeypatch.delenv("FUSEDFORMER_BACKEND", raising=False)
    handover.reset()
    measured = []

    def fake(input, fused, theirs):
        measured.append(tuple(input.shape))
        return handover.Decision(torch_serves, 2e-6, 1e-6 if torch_serves else 3e-6, tuple(input.shape))

    monkeypatch.setattr(handover, "_measure", fake)
    model = llama()
    patched = copy.deepcopy(model)
    ff.patch(patched)
    inputs = batch(model.config.vocab_size)
    if not padded:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    kwargs = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    try:
        with torch.no_grad():
            before = model.generate(**inputs, **kwargs)
            with torch.profiler.profile(record_shapes=True) as prof:
                after = patched.generate(**inputs, **kwargs)
    finally:
        handover.reset()
    assert torch.equal(before, after)
    assert measured, "no attention call was measured"
    decode = [e for e in prof.events() if e.name == "fusedformer::attention_fwd" and e.input_shapes[0][2] == 1]
    layers = model.config.num_hidden_layers
    assert len(decode) == (0 if torch_serves else 19 * layers)


def test_padding_free_batch_runs_on_varlen():
    """transformers passes the cumulative lengths of a padding-free batch (sequences packed in one row, as
    DataCollatorWithFlattening makes them) to the attention function: the fusedformer attention runs
    ff.varlen_attention, and each sequence's logits equal the unpatched model's on that sequence alone."""
    model = llama()
    patched = copy.deepcopy(model)
    ff.patch(patched)
    lengths = [17, 1, 40, 9]
    seqs = [torch.randint(4, model.config.vocab_size, (1, n)) for n in lengths]
    ids = torch.cat(seqs, dim=1)  # (1, 67)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    with torch.no_grad(), torch.profiler.profile() as prof:
        logits = patched(input_ids=ids, position_ids=position_ids, **packed).logits[0]  # (67, vocab)
    assert any(e.name == "fusedformer::varlen_attention_fwd" for e in prof.events())
    with torch.no_grad():
        expected = torch.cat([model(input_ids=s).logits[0] for s in seqs])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
