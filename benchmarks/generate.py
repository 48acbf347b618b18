"""Greedy generation, end to end: a GPT-2 built from its config (random weights, nothing downloaded),
transformers' "sdpa" against the same model patched with ``ff.patch``, side by side in one run.

    python benchmarks/generate.py [--batch 4] [--prompt 512] [--new 64] [--cache dynamic|static]
                                  [--layers 12] [--repeats 3] [--dtype float32|bfloat16]

Each repeat times both models back to back (alternating which goes first); the medians and their ratio
are printed with the CPU model and thread count. The tokens must be identical, or the run fails.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers

import fusedformer as ff


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = transformers.GPT2Config(n_layer=args.layers, n_positions=max(1024, args.prompt + args.new))
    sdpa = transformers.GPT2LMHeadModel(config).eval().to(dtype)
    fused = transformers.GPT2LMHeadModel(config).eval().to(dtype)
    fused.load_state_dict(sdpa.state_dict())
    print(ff.patch(fused))
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt))
    kwargs = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
        do_sample=False, pad_token_id=0,
    )
    if args.cache == "static":
        kwargs["cache_implementation"] = "static"

    def timed(model):
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(**kwargs)
            return time.perf_counter() - start, out

    timed(sdpa), timed(fused)  # warm-up: lazy init, the attention engine's calibration
    times: dict[str, list[float]] = {"sdpa": [], "fusedformer": []}
    for r in range(args.repeats):
        order = [("sdpa", sdpa), ("fusedformer", fused)]
        if r % 2:
            order.reverse()
        outs = {}
        for name, model in order:
            t, outs[name] = timed(model)
            times[name].append(t)
        if not torch.equal(outs["sdpa"], outs["fusedformer"]):
            raise SystemExit("FAILED: the patched model generated other tokens")
        print(f"repeat {r + 1}/{args.repeats}: sdpa {times['sdpa'][-1]:.2f} s, fusedformer {times['fusedformer'][-1]:.2f} s",
              flush=True)
    s, f = statistics.median(times["sdpa"]), statistics.median(times["fusedformer"])
    print(
        f"\nGPT-2 ({args.layers} layers, d=768) generate, batch {args.batch}, prompt {args.prompt}, {args.new} new "
        f"tokens, {args.cache} cache, {args.dtype}; {cpu_model()}, {torch.get_num_threads()} threads\n"
        f"  sdpa         {s:.3f} s (median of {args.repeats})\n"
        f"  fusedformer  {f:.3f} s\n"
        f"  sdpa / fusedformer = {s / f:.2f}x (identical tokens)"
    )


if __name__ == "__main__":
    main()
