"""Linear, measured: ``torch.nn.Linear`` whose float32 CPU calls run on whichever GEMM engine is faster here.

On a CPU, torch's float32 linear is MKL's sgemm; ``ff.linear`` is oneDNN's JIT-compiled brgemm. Which is
faster depends on the CPU (MKL is at the hardware's peak on Intel and on its AVX2 path on AMD, where
oneDNN runs about 2x faster on AVX-512) and on the shape (for a few rows the fused op's weight packing
costs more than it saves). So it is measured, never assumed: the first call of each class (out and in
features, bias or not, the rows rounded to a power of two, torch's thread count, and whether it trains)
times both on the call's own input, interleaved, and the faster serves every later call of that class in
this process (torch only when it is at least ``MARGIN`` faster). A training call (grad mode on, and the
input or a parameter requiring grad) is timed forward and backward together, with the same tensors
requiring grad: the fused backward runs its products on the same engine, torch's on MKL. ``FUSEDFORMER_HANDOVER=0`` and ``fusedformer.handover.off()``
keep the fused op (``ff.patch(verify=True)`` checks it that way). Under ``torch.compile``, on other
devices and in other dtypes, ``F.linear`` serves; ``explain`` says which and why.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fusedformer import handover
from fusedformer.ops.linear import linear, why_not_fused

__all__ = ["Linear", "conv1d_twin", "decisions", "reset"]

MARGIN = handover.MARGIN  # torch serves when its time is below MARGIN x the fused op's (the handover's rule)
_DECISIONS: dict[tuple, tuple[float, float]] = {}  # class -> (fused ms, torch ms)


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): ``nn.Linear``'s own; transformers' ``Conv1D`` stores (in, out), seen transposed
    (``ff.linear`` reads that layout in place)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def _trains(module: nn.Module, input: torch.Tensor, with_bias: bool) -> bool:
    """Whether this call builds a graph for a backward (grad mode on, something requiring grad)."""
    return torch.is_grad_enabled() and (
        input.requires_grad or module.weight.requires_grad or (with_bias and module.bias.requires_grad)
    )


def _class(module: nn.Module, input: torch.Tensor, with_bias: bool) -> tuple:
    rows = input.numel() // max(input.shape[-1], 1)
    out_features, in_features = _weight(module).shape
    return (out_features, in_features, with_bias, input.dtype, max(rows, 1).bit_length(),
            torch.get_num_threads(), _trains(module, input, with_bias))


def _measure(module: nn.Module, input: torch.Tensor, with_bias: bool) -> tuple[float, float]:
    originals = (input, module.weight) + ((module.bias,) if with_bias else ())
    x, w = input.detach(), _weight(module).detach()
    b = module.bias.detach() if with_bias else None
    fns = (lambda: linear(x, w, b), lambda: F.linear(x, w, b))
    if _trains(module, input, with_bias):  # forward and backward, the same leaves requiring grad
        for t, original in zip((x, w, b), originals):
            t.requires_grad_(original.requires_grad)
        leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
        grad = torch.randn(*input.shape[:-1], w.shape[0], dtype=input.dtype)

        def step(fn):
            return lambda: torch.autograd.grad(fn(), leaves, grad)

        fns = (step(fns[0]), step(fns[1]))
    times: list[list[float]] = [[], []]
    with contextlib.nullcontext() if _trains(module, input, with_bias) else torch.no_grad():
        first = []
        for fn in fns:  # warm-up: oneDNN compiles its kernels for this shape (so its first call is slow)
            t0 = time.perf_counter()
            fn()
            first.append(time.perf_counter() - t0)
        if first[1] > 3 * first[0]:  # torch 3x slower than even the fused op's first call: no need to
            return first[0] * 1e3, first[1] * 1e3  # repeat (float16 without AVX512-FP16: ~1 GFLOP/s)
        for _ in range(3):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def decisions() -> dict[tuple, tuple[float, float]]:
    """Every class measured in this process: ``{(out, in, bias, dtype, log2 rows class, threads, training):
    (fused ms, torch ms)}`` (a training class timed forward and backward)."""
    return dict(_DECISIONS)


def reset() -> None:
    """Forgets the measurements (the next call of each class measures again)."""
    _DECISIONS.clear()


class _Measured:
    """The measured projection of ``Linear`` and of the ``Conv1D`` twins: ``self.weight`` (seen as (out, in)
    through ``_weight``) and ``self.bias`` (or None)."""

    def _fused_serves(self, input: torch.Tensor, with_bias: bool) -> bool:
        bias = self.bias if with_bias else None
        if torch.compiler.is_compiling() or input.numel() == 0 or torch.is_autocast_enabled(input.device.type):
            return False  # (under autocast: F.linear, autocast's own casts and engine)
        if why_not_fused(input, _weight(self), bias) is not None:
            return False
        if not handover._enabled():  # FUSEDFORMER_HANDOVER=0, handover.off(): the fused op, unmeasured
            return True
        key = _class(self, input, with_bias)
        times = _DECISIONS.get(key)
        if times is None:
            times = _DECISIONS[key] = _measure(self, input, with_bias)
        return not times[1] < MARGIN * times[0]

    def project(self, input: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``input @ weight^T (+ bias)`` on the engine measured faster; ``bias=False`` leaves the bias out
        (a fused GELU that takes it instead). Shape: ``(*, in_features)`` -> ``(*, out_features)``."""
        # the module's memo first (one dict read per call): by input shape, dtype, device kind, the
        # handover switches (handover.memo_key), torch's thread count, the bias, whether it trains and autocast
        with_bias = bias and self.bias is not None
        key = (handover.memo_key(input), torch.get_num_threads(), with_bias, _trains(self, input, with_bias),
               torch.is_autocast_enabled(input.device.type))
        memo = self.__dict__.get("_ff_linear")
        use = memo.get(key) if memo is not None else None
        if use is None:
            use = self._fused_serves(input, with_bias)
            if not torch.compiler.is_compiling():
                if memo is None:
                    memo = self.__dict__["_ff_linear"] = {}
                memo[key] = use
        b = self.bias if with_bias else None
        if use:
            return linear(input, _weight(self), b)
        return F.linear(input, _weight(self), b)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_ff_linear", None)  # parameters moved or cast: decide again
        return super()._apply(fn, recurse)

    def explain(self, input: torch.Tensor) -> str:
        """Which engine serves this module's call on ``input``, and why (measured times where known)."""
        why = why_not_fused(input, _weight(self), self.bias)
        if torch.compiler.is_compiling():
            why = "under torch.compile (Inductor plans its own GEMMs)"
        elif torch.is_autocast_enabled(input.device.type):
            why = "under torch.autocast (F.linear with autocast's casts)"
        if why is not None:
            return f"linear: F.linear serves ({why})"
        if not handover._enabled():
            return "linear: fusedformer's oneDNN brgemm serves (handover off: not measured)"
        times = _DECISIONS.get(_class(self, input, self.bias is not None))
        if times is None:
            return "linear: not measured yet; the first call of this class times both and the faster serves"
        who = "fusedformer's oneDNN brgemm" if not times[1] < MARGIN * times[0] else "F.linear (MKL)"
        return f"linear: {who} serves (measured: fused {times[0]:.3f} ms, torch {times[1]:.3f} ms)"


class Linear(_Measured, nn.Linear):
    """``torch.nn.Linear`` (same constructor, parameters and semantics) whose float32 CPU calls run on
    ``ff.linear`` (oneDNN's brgemm) or ``F.linear`` (MKL), whichever measured faster for the call's class
    (float16 calls likewise, ``ff.linear`` computing them in float32).

    Shape: input ``(*, in_features)`` -> output ``(*, out_features)``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (*, in_features) -> (*, out_features)
        return self.project(input)


_CONV1D_TWINS: dict[type, type] = {}


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:  # (*, nx) -> (*, nf)
    """transformers' ``Conv1D`` (``x @ weight + bias``, weight stored (nx, nf)) on the engine measured faster:
    ``ff.linear`` reads the weight in place as its transpose."""
    return self.project(x)


def conv1d_twin(cls: type) -> type:
    """A subclass of transformers' ``Conv1D`` class ``cls`` (GPT-2's linear layer, weight stored (in, out)) whose
    forward runs on ``ff.linear`` or torch's GEMM, whichever measured faster, as ``Linear`` does. It adds no
    state, so ``ff.patch`` swaps an instance's class to it and back."""
    if cls not in _CONV1D_TWINS:
        _CONV1D_TWINS[cls] = type(
            f"Fused{cls.__name__}", (_Measured, cls),
            {"forward": _conv1d_forward, "__module__": __name__, "__doc__": conv1d_twin.__doc__},
        )  # fmt: skip
    return _CONV1D_TWINS[cls]
