"""Side by side in one process, interleaved: fused norms against torch's, and the encoder layer.

    python benchmarks/norms_side_by_side.py [--repeats 15] [--only norms|encoder]

- ``rms_norm`` fwd+bwd: ``ff.rms_norm`` vs ``F.rms_norm`` on (8192, 4096) float32 with a weight;
- ``add_layer_norm`` fwd+bwd: ``ff.add_layer_norm`` vs ``x + r`` then ``F.layer_norm`` (same shape, weight
  and bias), the gradient through the normalised output;
- ``add_rms_norm`` fwd+bwd likewise against ``x + r`` then ``F.rms_norm``;
- the encoder layer fwd+bwd: ``ff.nn.TransformerEncoderLayer`` vs ``torch.nn.TransformerEncoderLayer`` with
  the same weights (B=4, L=256, d=512, 8 heads, ff=2048, GELU, dropout 0.1, training mode, batch_first),
  for both ``norm_first`` settings. Runs on any checkout (the functions a checkout lacks are skipped),
  so the same script measures before and after a change.

Each repeat runs every provider of a row once, in a rotating order; medians and (min, max) in ms.
Name the CPU with the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedformer as ff


def _interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    names = list(fns)
    for fn in fns.values():  # warm-up
        fn()
        fn()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    return samples


def _report(title: str, samples: dict[str, list[float]], base: str) -> None:
    med = {n: statistics.median(s) for n, s in samples.items()}
    print(title)
    for n, s in samples.items():
        ratio = med[base] / med[n]
        print(f"  {n:12s} median {med[n] * 1e3:9.2f} ms  (min {min(s) * 1e3:.2f}, max {max(s) * 1e3:.2f})"
              f"  speed vs {base}: {ratio:.2f}x")  # fmt: skip


def _fwd_bwd(forward, leaves, grad):
    def run():
        for t in leaves:
            t.grad = None
        forward().backward(grad)

    return run


def norms(repeats: int) -> None:
    torch.manual_seed(0)
    N, D = 8192, 4096
    x = torch.randn(N, D, requires_grad=True)
    r = torch.randn(N, D, requires_grad=True)
    w = torch.randn(D, requires_grad=True)
    b = torch.randn(D, requires_grad=True)
    g = torch.randn(N, D)
    if hasattr(ff, "rms_norm"):
        _report(
            f"rms_norm fwd+bwd ({N}, {D}) float32",
            _interleaved(
                {
                    "fusedformer": _fwd_bwd(lambda: ff.rms_norm(x, (D,), w), [x, w], g),
                    "torch": _fwd_bwd(lambda: F.rms_norm(x, (D,), w), [x, w], g),
                },
                repeats,
            ),
            "torch",
        )
    if hasattr(ff, "add_layer_norm"):
        _report(
            f"add_layer_norm fwd+bwd ({N}, {D}) float32",
            _interleaved(
                {
                    "fusedformer": _fwd_bwd(lambda: ff.add_layer_norm(x, r, (D,), w, b)[0], [x, r, w, b], g),
                    "torch": _fwd_bwd(lambda: F.layer_norm(x + r, (D,), w, b), [x, r, w, b], g),
                },
                repeats,
            ),
            "torch",
        )
        _report(
            f"add_rms_norm fwd+bwd ({N}, {D}) float32",
            _interleaved(
                {
                    "fusedformer": _fwd_bwd(lambda: ff.add_rms_norm(x, r, (D,), w)[0], [x, r, w], g),
                    "torch": _fwd_bwd(lambda: F.rms_norm(x + r, (D,), w), [x, r, w], g),
                },
                repeats,
            ),
            "torch",
        )


def encoder(repeats: int) -> None:
    B, L, d, h, dff = 4, 256, 512, 8, 2048
    for norm_first in (False, True):
        torch.manual_seed(0)
        kw = dict(d_model=d, nhead=h, dim_feedforward=dff, dropout=0.1, activation="gelu", batch_first=True,
                  norm_first=norm_first)  # fmt: skip
        ref = nn.TransformerEncoderLayer(**kw).train()
        fused = ff.nn.TransformerEncoderLayer(**kw).train()
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(B, L, d, requires_grad=True)
        g = torch.randn(B, L, d)
        _report(
            f"TransformerEncoderLayer fwd+bwd B={B} L={L} d={d} h={h} ff={dff} p=0.1 norm_first={norm_first}",
            _interleaved(
                {
                    "fusedformer": _fwd_bwd(lambda: fused(x), [x, *fused.parameters()], g),
                    "torch": _fwd_bwd(lambda: ref(x), [x, *ref.parameters()], g),
                },
                repeats,
            ),
            "torch",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", choices=("norms", "encoder"), default=None)
    args = parser.parse_args()
    print(f"fusedformer from {ff.__file__}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    if args.only in (None, "norms"):
        norms(args.repeats)
    if args.only in (None, "encoder"):
        encoder(args.repeats)


if __name__ == "__main__":
    main()
