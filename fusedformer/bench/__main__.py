"""``fusedformer-bench`` / ``python -m fusedformer.bench``: fusedformer against torch and naive, side by side.

    fusedformer-bench --quick                      # < 2 minutes on 2 cores
    fusedformer-bench                              # the full run (meant for < 15 minutes on 2 quiet cores)
    fusedformer-bench --cases attention --lengths 512,2048 --causal yes --modes fwd+bwd
    fusedformer-bench --cases attention --attention-dtypes bfloat16 --no-memory

Prints a table at the end (stdout; progress goes to stderr) and writes into ``--out`` (default
``bench-results/``): ``results.csv``, ``report.txt``, ``report.md`` and the PNG plots.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from pathlib import Path

import torch

from fusedformer.bench.cases import ALL_PROVIDERS, CASES, MODES
from fusedformer.bench.timing import TimingConfig

_DTYPES = ("float32", "float64", "float16", "bfloat16")


def _list(kind, allowed=None):
    def parse(text: str):
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if allowed is not None:
            bad = [i for i in items if i not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(map(str, bad))}; choose from {', '.join(allowed)}"
                )
        return tuple(items)

    return parse


def _positive_ints(text: str) -> tuple[int, ...]:
    items = _list(int)(text)
    if any(i <= 0 for i in items):
        raise argparse.ArgumentTypeError("expected positive integers")
    return items


def _shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """``ROWSxINxOUT,...`` -> ((rows, in, out), ...)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected ROWSxINxOUT with positive integers, got {item!r}")
        out.append(tuple(int(p) for p in parts))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedformer-bench",
        description="Benchmark fusedformer's fused kernels against torch and naive attention, side by side.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats: under 2 minutes on 2 cores")
    p.add_argument("--cases", type=_list(str, CASES), default=CASES, help=f"default: {','.join(CASES)}")
    p.add_argument("--providers", type=_list(str, ALL_PROVIDERS), default=ALL_PROVIDERS,
                   help=f"default: {','.join(ALL_PROVIDERS)}")  # fmt: skip
    p.add_argument("--modes", type=_list(str, MODES), default=MODES,
                   help=f"for attention, LayerNorm and GELU (default: {','.join(MODES)})")  # fmt: skip
    p.add_argument("--layer-modes", type=_list(str, MODES), default=("fwd+bwd",),
                   help="for the encoder and decoder layers (default: fwd+bwd)")  # fmt: skip
    p.add_argument("--dtype", choices=_DTYPES, default="float32",
                   help="for LayerNorm, GELU and the layers (default: float32); "
                   "attention runs at --attention-dtypes")  # fmt: skip
    g = p.add_argument_group("attention")
    g.add_argument("--attention-dtypes", type=_list(str, _DTYPES), default=None,
                   help="attention runs at each, in one run (default: float32,bfloat16,float16; "
                   "--quick: float32,bfloat16)")  # fmt: skip
    g.add_argument("--lengths", type=_positive_ints, default=None,
                   help="sequence lengths L = S at float32 and float64 (default: 256,512,...,8192; "
                   "--quick: 256,1024); given alone, at every dtype")  # fmt: skip
    g.add_argument("--lengths-16bit", type=_positive_ints, default=None,
                   help="sequence lengths at bfloat16 and float16 (default: 512,1024,2048,4096; "
                   "--quick: 256,1024; with --lengths: the same as --lengths)")  # fmt: skip
    g.add_argument("--batch", type=int, default=1, help="B (default: 1)")
    g.add_argument("--heads", type=int, default=8, help="H (default: 8)")
    g.add_argument("--head-dim", type=int, default=64, help="E (default: 64)")
    g.add_argument("--causal", choices=("both", "yes", "no"), default="both", help="default: both")
    g = p.add_argument_group("LayerNorm and GELU")
    g.add_argument("--rows", type=_positive_ints, default=None, help="row counts (default: 2048,8192; --quick: 4096)")
    g.add_argument("--widths", type=_positive_ints, default=None,
                   help="widths (default: 512,1024,4096; --quick: 1024,4096)")  # fmt: skip
    g.add_argument("--gelu-approximate", choices=("none", "tanh"), default="none", help="default: none")
    g = p.add_argument_group("linear layers (CPU, float32 and float16)")
    g.add_argument("--linear-shapes", type=_shapes, default=None,
                   help="ROWSxINxOUT,... (default: 3904x384x1536,3904x1536x384,8192x512x2048,8192x2048x512; "
                   "--quick: 1024x256x1024)")  # fmt: skip
    g = p.add_argument_group("encoder and decoder layers")
    g.add_argument("--layer-batch", type=int, default=None, help="default: 8 (--quick: 4)")
    g.add_argument("--layer-length", type=int, default=None, help="default: 1024 (--quick: 256)")
    g.add_argument("--d-model", type=int, default=None, help="default: 512 (--quick: 256)")
    g.add_argument("--nhead", type=int, default=None, help="default: 8 (--quick: 4)")
    g.add_argument("--dim-feedforward", type=int, default=None, help="default: 2048 (--quick: 1024)")
    g.add_argument("--dropout", type=float, default=0.1, help="default: 0.1")
    g.add_argument("--activation", choices=("gelu", "relu"), default="gelu", help="default: gelu")
    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=None,
                   help="at most this many interleaved repeats per measurement, and at least 3 "
                   "(default: 10; --quick: 5)")  # fmt: skip
    g.add_argument("--budget", type=float, default=None,
                   help="seconds of repeats per measurement, all providers together, within those bounds "
                   "(default: 2.5; --quick: 0.6)")  # fmt: skip
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    g.add_argument("--cpu-cache-mb", type=int, default=None,
                   help="cap fusedformer's CPU output cache at this many MiB for the run (0: off; default: "
                   "FUSEDFORMER_CPU_CACHE_MB, else 256); benchmarks/cache_on_off.sh compares on and off")  # fmt: skip
    g.add_argument("--memory-all-sizes", action="store_true",
                   help="probe memory at every size (the default, except with --quick: the largest only)")  # fmt: skip
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory for results.csv, report.txt, report.md and the PNGs (default: bench-results)")  # fmt: skip
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--markdown", type=Path, default=None,
                   help="also write the Markdown page here (e.g. benchmarks/BENCHMARKS.md)")  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("fusedformer-bench: --device cuda, but torch sees no CUDA device")
    return text


def config_from_args(args: argparse.Namespace, argv: list[str]):
    from fusedformer.bench.runner import default_config

    base = default_config(quick=args.quick)
    timing = base.timing
    if args.repeats is not None or args.budget is not None:
        max_repeats = max(1, args.repeats) if args.repeats is not None else timing.max_repeats
        timing = TimingConfig(
            max_repeats=max_repeats,
            min_repeats=min(timing.min_repeats, max_repeats),
            budget_s=args.budget if args.budget is not None else timing.budget_s,
            min_sample_s=timing.min_sample_s,
            warmup_s=timing.warmup_s,
        )
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    return default_config(
        quick=args.quick,
        device=_device(args.device),
        dtype=args.dtype,
        cases=args.cases,
        providers=args.providers,
        modes=args.modes,
        layer_modes=args.layer_modes,
        attention_dtypes=args.attention_dtypes,
        lengths=args.lengths,
        lengths_16bit=args.lengths_16bit,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        causal=causal,
        rows=args.rows,
        widths=args.widths,
        gelu_approximate=args.gelu_approximate,
        linear_shapes=args.linear_shapes,
        layer_batch=args.layer_batch,
        layer_length=args.layer_length,
        d_model=args.d_model,
        nhead=args.nhead,
        dim_feedforward=args.dim_feedforward,
        dropout=args.dropout,
        activation=args.activation,
        timing=timing,
        memory=not args.no_memory,
        memory_all_sizes=True if args.memory_all_sizes else None,
        command=" ".join(["fusedformer-bench", *map(shlex.quote, argv)]),
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    config = config_from_args(args, argv)
    if args.cpu_cache_mb is not None:
        if args.cpu_cache_mb < 0:
            raise SystemExit("fusedformer-bench: --cpu-cache-mb must be >= 0")
        os.environ["FUSEDFORMER_CPU_CACHE_MB"] = str(args.cpu_cache_mb)  # for the memory probes' subprocesses
        from fusedformer import backends

        if backends._C is not None:
            backends._C.set_cache_limit(args.cpu_cache_mb << 20)
            backends._C.empty_cache()

    from fusedformer.bench import memory, plots, report
    from fusedformer.bench.runner import run

    result = run(config, progress=not args.no_progress)
    text = report.format_report(result)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(result.rows, out / "results.csv")
    (out / "report.txt").write_text(text + "\n")
    plot_paths = [] if args.no_plots else plots.make_plots(result, out, memory.total_bytes(config.device))
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        print("fusedformer-bench: matplotlib is not installed, so no plots (pip install matplotlib)", file=sys.stderr)
    report.write_markdown(result, text, plot_paths, out / "report.md", config.command)
    if args.markdown is not None:
        report.write_markdown(result, text, plot_paths, args.markdown, config.command)
    print(text)
    written = [out / "results.csv", out / "report.txt", out / "report.md", *plot_paths]
    if args.markdown is not None:
        written.append(args.markdown)
    print("wrote: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
