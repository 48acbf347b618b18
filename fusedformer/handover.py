"""Small inference calls of ``ff.nn.LayerNorm``, ``ff.nn.GELU`` and of the ``"fusedformer"`` attention of a
patched Hugging Face model handed to torch's own function where that measures faster.

Why: a fused kernel saves passes over memory, which a few thousand elements do not have. There a call
costs what its dispatch costs, and torch's ``F.layer_norm`` goes from Python to its kernel by a shorter
road than a custom op can (a generated binding against ``torch.ops``' schema parsing). A patched model
served one sentence at a time would pay that on every LayerNorm.

When: only in the modules and in transformers' attention function (``fusedformer.patching.hf``: op
``"attention"``, at most ``HANDOVER_MAX_SCORES`` scores, no dropout, not a mask together with is_causal);
``ff.layer_norm``, ``ff.gelu`` and ``ff.scaled_dot_product_attention`` always run fusedformer's kernels. Only for
inference (grad mode off: ``torch.no_grad()`` or ``torch.inference_mode()``), plain CPU tensors, not
under ``torch.compile``, not while ``FUSEDFORMER_BACKEND`` forces a backend, not with
``FUSEDFORMER_HANDOVER=0``, and not inside ``with handover.off():`` (``ff.patch(verify=True)`` checks the
fused kernels that way). Calls above ``MAX_ELEMENTS`` always run fused (measuring them would cost
a copy of the input's size).

Which: measured, never assumed. The first inference call of each class (op, dtype, last dim, the
module's options and the element count rounded to a power of two) times both functions on random
data of the call's shape, interleaved, and the faster serves every later call of that class in this
process (torch only when it is at least ``MARGIN`` faster: a tie stays fused). ``explain`` on the
module reports the decision and the two times; ``decisions()`` lists them all (attention's too).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch

from fusedformer import backends

__all__ = [
    "Decision",
    "MAX_ELEMENTS",
    "MARGIN",
    "applies",
    "decide",
    "decisions",
    "describe",
    "explained",
    "forget",
    "known",
    "memo_key",
    "module_decides",
    "off",
    "reset",
]

MAX_ELEMENTS = 1 << 21  # calls up to 2 Mi elements are measured; larger ones run fused
MARGIN = 0.97  # torch serves when its time is below MARGIN x fusedformer's


class Decision(NamedTuple):
    """One measured class of calls: who serves it, and the per-call medians (seconds) behind that."""

    torch_serves: bool
    fused_seconds: float
    torch_seconds: float
    shape: tuple[int, ...]  # the shape measured (the first call's)


_DECISIONS: dict[tuple, Decision] = {}
# the modules holding a memo (module._ff_handover), emptied by reset()
_MEMO_HOLDERS: weakref.WeakSet = weakref.WeakSet()


class _Environ:
    """``.get(b"NAME")`` on the environment: os.environ's own dict of bytes on POSIX (~0.05 us a read,
    current after ``os.environ[...] =`` and ``del``), else os.environ itself."""

    def get(self, name: bytes):
        value = os.environ.get(name.decode())
        return None if value is None else value.encode()


ENV = backends._ENVIRON_BYTES if isinstance(backends._ENVIRON_BYTES, dict) else _Environ()


_OFF = [0]  # depth of `with off():` blocks


def _enabled() -> bool:
    return not _OFF[0] and not ENV.get(b"FUSEDFORMER_BACKEND") and ENV.get(b"FUSEDFORMER_HANDOVER") != b"0"


@contextlib.contextmanager
def off():
    """Inside, every module call runs fusedformer's kernel (as with ``FUSEDFORMER_HANDOVER=0``), in this
    process, all threads; used by ``ff.patch(verify=True)``, whose point is to check the fused kernels."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


def applies(input: torch.Tensor) -> bool:
    """Whether a module call on ``input`` may be handed over at all (the conditions in the module doc)."""
    return (
        not torch.is_grad_enabled()
        and type(input) is torch.Tensor
        and input.is_cpu
        and 0 < input.numel() <= MAX_ELEMENTS
        and not torch.compiler.is_compiling()
        and _enabled()
    )


def _key(op: str, input: torch.Tensor, options: tuple) -> tuple:
    return (op, input.dtype, input.shape[-1] if input.dim() else 1, input.numel().bit_length(), options)


def known(op: str, input: torch.Tensor, options: tuple = ()) -> Decision | None:
    """The decision for ``input``'s class of ``op`` calls, or None before its first call (never measures)."""
    return _DECISIONS.get(_key(op, input, options))


def decide(op: str, input: torch.Tensor, options: tuple, pair: Callable[[], tuple[Callable, Callable]]) -> bool:
    """Whether torch's function serves this inference call rather than fusedformer's. ``pair()`` gives
    (fused, torch's), each a function of the input alone that closes over the rest (parameters, eps);
    it is called only to measure. Call only when ``applies(input)``. Measures on the first call of the
    class (a few ms), then answers from memory."""
    key = _key(op, input, options)
    d = _DECISIONS.get(key)
    if d is None:
        d = _DECISIONS[key] = _measure(input, *pair())
    return d.torch_serves


def _measure(input: torch.Tensor, fused, theirs) -> Decision:
    # random data of the call's shape from a private generator: the user's RNG stream is untouched
    gen = torch.Generator().manual_seed(0)
    # laid out as the input (a dense view, as attention's (B, L, H, E) -> (B, H, L, E) query, keeps its strides)
    x = torch.empty_like(input).copy_(torch.randn(input.shape, generator=gen, dtype=torch.float32))
    for fn in (fused, theirs, fused, theirs):  # warm-up: first-call costs, caches
        fn(x)
    t0 = time.perf_counter()
    fused(x), theirs(x)
    once = max(time.perf_counter() - t0, 1e-7)
    calls = max(3, min(200, int(4e-4 / once)))  # ~0.2 ms of each per round
    ours, torch_times = [], []
    for r in range(7):
        pair = ((fused, ours), (theirs, torch_times)) if r % 2 == 0 else ((theirs, torch_times), (fused, ours))
        for fn, out in pair:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(x)
            out.append((time.perf_counter() - t0) / calls)
    a, b = statistics.median(ours), statistics.median(torch_times)
    return Decision(b < MARGIN * a, a, b, tuple(input.shape))


def memo_key(input: torch.Tensor) -> tuple:
    """The key of a module's memo of its decisions: the input's shape, dtype and device kind, ``off()``,
    and the two environment variables that turn handing over off (read on every call, so setting them
    takes effect)."""
    return (
        input.shape, input.dtype, input.is_cpu, _OFF[0],
        ENV.get(b"FUSEDFORMER_HANDOVER"), ENV.get(b"FUSEDFORMER_BACKEND"),
    )


def module_decides(
    module: torch.nn.Module, key: tuple, input: torch.Tensor, op: str, options: tuple, pair, params=(),
    allowed: bool = True,
) -> bool:
    """A module's first call with memo ``key``: whether torch serves (``applies``, then ``decide``), kept
    in the module's memo ``module._ff_handover`` so that later calls with that key read one dict. Never
    hands over when a parameter in ``params`` has another dtype than the input (the fused path casts it),
    nor when the caller says the call is not ``allowed`` (remembered all the same)."""
    use = allowed and applies(input) and all(p is None or p.dtype == input.dtype for p in params)
    use = use and decide(op, input, options, pair)
    if not torch.compiler.is_compiling():
        memo = module.__dict__.get("_ff_handover")
        if memo is None:
            memo = module.__dict__["_ff_handover"] = {}
            _MEMO_HOLDERS.add(module)
        memo[key] = use
    return use


def forget(module: torch.nn.Module) -> None:
    """Drops a module's memo (its parameters moved or changed dtype: ``nn.Module._apply``)."""
    module.__dict__.pop("_ff_handover", None)


def decisions() -> dict[tuple, Decision]:
    """Every class measured in this process: ``{(op, dtype, last dim, log2 size class, options): Decision}``."""
    return dict(_DECISIONS)


def reset() -> None:
    """Forgets every decision (the next inference call of each class measures again)."""
    _DECISIONS.clear()
    for module in list(_MEMO_HOLDERS):
        forget(module)


def describe(op: str, torch_fn: str, input: torch.Tensor, options: tuple = ()) -> str | None:
    """``explain``'s words for a module call on ``input``: None where no handover applies (the fused
    explanation stands), else what was or will be measured and who serves."""
    if not applies(input):
        return None
    d = known(op, input, options)
    if d is None:
        return (
            f"an inference call of {input.numel()} elements: its first call of this size class times {torch_fn} "
            "against fusedformer's kernel, and the faster serves (not measured yet)"
        )
    verdict = torch_fn if d.torch_serves else "fusedformer's kernel"
    return (
        f"an inference call of {input.numel()} elements: {verdict} serves this size class, measured "
        f"{d.fused_seconds * 1e6:.1f} us fused against {d.torch_seconds * 1e6:.1f} us for {torch_fn} "
        f"(at shape {list(d.shape)}; FUSEDFORMER_HANDOVER=0 keeps the fused kernel)"
    )


def explained(fused: backends.Explanation, op: str, torch_fn: str, input: torch.Tensor, options: tuple) -> backends.Explanation:
    """``fused`` (the functional call's explanation), told what ``fusedformer.handover`` does with a
    module call on ``input``: served by ``"torch"`` where the measurement handed its class over."""
    words = describe(op, torch_fn, input, options)
    if words is None:
        return fused
    d = known(op, input, options)
    if d is not None and d.torch_serves:
        return backends.Explanation(fused.op, "torch", fused.reasons, forced=False, detail=words)
    detail = f"{fused.detail}; {words}" if fused.detail else words
    return backends.Explanation(fused.op, fused.backend, fused.reasons, forced=fused.forced, detail=detail)
