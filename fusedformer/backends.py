"""Which backend serves a call, and why the others could not.

Each backend states what it supports as data and answers ``not_supported_reasons(request)``. A call
walks the priority list (``cpp``, then ``triton``) and takes the first backend with no reason against
it. When none fits, the call runs on ``reference`` with a one-time warning naming every reason;
``FUSEDFORMER_STRICT=1`` turns that into an error. ``FUSEDFORMER_BACKEND=cpp|triton|reference`` forces
a backend, and a forced backend that cannot serve the call raises: nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import NamedTuple

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "call",
    "cpu_matmul_engines",
    "cuda_capability",
    "Explanation",
    "ExtensionWarning",
    "FallbackWarning",
    "Request",
    "autocast_dtype",
    "autocast_cast",
    "register_triton_op",
    "report_fallback",
    "select",
]

BACKENDS = ("cpp", "triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """No backend may serve the call the way the environment demands (forced backend, strict mode)."""


class FallbackWarning(UserWarning):
    """A call runs on the reference path because no fused kernel can serve it."""


class Request(NamedTuple):
    """What the backends need to know about one call (built from validated inputs). A NamedTuple:
    immutable, hashable (the selection cache's key) and built in a fraction of a frozen dataclass's time,
    which every call pays."""

    op: str  # "attention", "varlen_attention", "attention_with_kv_cache", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm" or "gelu"
    device: torch.device
    dtype: torch.dtype
    dropout_p: float = 0.0
    mask_requires_grad: bool = False


class ExtensionWarning(UserWarning):
    """fusedformer._C did not load, or was built against another torch than the one running."""


def _built_with_torch() -> tuple[str | None, str]:
    """The torch version _C was built against and the command that rebuilds it, from the module that
    setup.py writes beside _C (readable even when _C itself cannot load); (None, ...) without one."""
    try:
        from fusedformer import _build_info
    except ImportError:
        return None, "pip install --no-build-isolation --force-reinstall --no-deps ."
    return _build_info.TORCH_VERSION, _build_info.REBUILD_COMMAND


def _load_extension() -> tuple[object | None, str | None]:
    """Imports _C; on failure, or when it was built against another torch, says so loudly (an
    ``ExtensionWarning`` at import) and returns the reason, which the cpp backend then gives for every call."""
    built, rebuild = _built_with_torch()
    mismatch = (
        f"fusedformer._C was built against torch {built} but torch {torch.__version__} is running; "
        f"rebuild it against this torch from the source tree with `{rebuild}`"
        if built is not None and built != torch.__version__
        else None
    )
    try:
        from fusedformer import _C  # noqa: F401  (loading it registers the ops)
    except ImportError as e:  # the package imports without its extension; the cpp backend says why
        why = f"the C++ extension fusedformer._C did not load ({e})"
        if mismatch is not None:
            why += "; " + mismatch
        elif built is None:
            why += f"; build it with `{rebuild}` (or `python setup.py build_ext --inplace` in a checkout)"
        warnings.warn(f"fusedformer: {why}. Every CPU call will run on the slow reference path "
                      "(O(n²) attention) or, with FUSEDFORMER_STRICT=1, raise.", ExtensionWarning, stacklevel=2)
        return None, why
    built = _C.built_with_torch() if hasattr(_C, "built_with_torch") else built  # _C's own record wins
    if built is not None and built != torch.__version__:
        # _C loaded, but it was compiled for another torch's ABI: it may crash or compute wrongly
        global _MISMATCH
        _MISMATCH = (
            f"fusedformer._C was built against torch {built} but torch {torch.__version__} is running; "
            f"rebuild it against this torch from the source tree with `{rebuild}`"
        )
        warnings.warn(f"fusedformer: {_MISMATCH}.", ExtensionWarning, stacklevel=2)
    return _C, None


_MISMATCH: str | None = None  # set by _load_extension when a loaded _C was built against another torch
_C, _C_ERROR = _load_extension()
# Read once, here: the C++ kernels register when _C loads, and torch.compile cannot trace this query.
# The op that holds each family's CPU kernel.
_CPU_OPS = {
    "attention": "attention_fwd",
    "attention_with_kv_cache": "attention_with_kv_cache",
    "varlen_attention": "varlen_attention_fwd",
    "layer_norm": "layer_norm_fwd",
    "rms_norm": "rms_norm_fwd",
    "add_layer_norm": "add_layer_norm_fwd",
    "add_rms_norm": "add_rms_norm_fwd",
    "gelu": "gelu_fwd",
}
_CPU_KERNELS = {
    family: _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedformer::{op}", "CPU")
    for family, op in _CPU_OPS.items()
}


def _common_reasons(request: Request) -> list[str]:
    reasons = []
    if request.dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype {request.dtype} is not one of float32, float64, float16, bfloat16")
    if request.mask_requires_grad:
        reasons.append("attn_mask requires grad, and the fused kernels give no gradient for the mask")
    return reasons


class CppBackend:
    name = "cpp"
    SUPPORTED_DEVICES = ("cpu",)
    SUPPORTED_DTYPES = FLOAT_DTYPES

    def not_supported_reasons(self, request: Request) -> list[str]:
        if _C is None:
            return [_C_ERROR]
        reasons = []
        if request.device.type not in self.SUPPORTED_DEVICES:
            reasons.append(f"serves CPU tensors, got {request.device.type}")
        if not _CPU_KERNELS.get(request.op, False):
            reasons.append(f"fusedformer::{_CPU_OPS[request.op]} has no CPU kernel in this build")
        return reasons + _common_reasons(request)


def _load_triton_kernels() -> tuple[dict[str, object], str | None]:
    """fusedformer.kernels' modules by op family, or why they could not be imported.

    Imported with the package: TRITON_INTERPRET must be set before ``import fusedformer`` for the kernels
    to run on CPU tensors under Triton's interpreter (``@triton.jit`` reads it when it runs).
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return {}, "triton is not installed (pip install triton)"
    try:
        from fusedformer.kernels import _common, attention, decode, gelu, layer_norm
    except Exception as e:  # a broken triton install must not break `import fusedformer`
        return {}, f"the Triton kernels failed to import ({type(e).__name__}: {e})"
    return {"attention": attention, "decode": decode, "layer_norm": layer_norm, "gelu": gelu, "_common": _common}, None


TRITON_KERNELS, _TRITON_ERROR = _load_triton_kernels()
TRITON_INTERPRETED = bool(TRITON_KERNELS) and TRITON_KERNELS["_common"].INTERPRET


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of CUDA ``device``, or None on ROCm (whose numbering means something else)."""
    if torch.version.hip is not None:
        return None
    return torch.cuda.get_device_capability(device)


def _bf16_capability_reasons(device: torch.device) -> list[str]:
    # bf16 tl.dot needs sm_80 (Ampere) tensor cores, and below sm_80 Triton has no native bf16 conversions
    # either: attention fails to compile there, LayerNorm and GELU are held to the same bar (no GPU below
    # sm_80 has run them). Such a call falls back, and ff.explain says why.
    cap = cuda_capability(device)
    if cap is not None and cap < (8, 0):
        return [f"bfloat16 needs compute capability 8.0 (sm_80) or newer; {device} has sm_{cap[0]}{cap[1]}"]
    return []


class TritonBackend:
    name = "triton"
    SUPPORTED_DEVICES = ("cuda",)  # and "cpu" when interpreted
    SUPPORTED_DTYPES = {  # by op family
        "attention": (torch.float32, torch.float16, torch.bfloat16),
        "attention_with_kv_cache": (torch.float32, torch.float16, torch.bfloat16),
        "varlen_attention": (torch.float32, torch.float16, torch.bfloat16),
        "layer_norm": FLOAT_DTYPES,
        "rms_norm": FLOAT_DTYPES,
        "add_layer_norm": FLOAT_DTYPES,
        "add_rms_norm": FLOAT_DTYPES,
        "gelu": FLOAT_DTYPES,
    }

    def not_supported_reasons(self, request: Request) -> list[str]:
        if _TRITON_ERROR is not None:
            return [_TRITON_ERROR]
        reasons = []
        device = request.device.type
        if device == "cpu" and not TRITON_INTERPRETED:
            reasons.append(
                "serves CUDA tensors, got cpu (set TRITON_INTERPRET=1 before importing fusedformer to run the "
                "Triton kernels on CPU tensors under Triton's interpreter)"
            )
        elif device not in ("cuda", "cpu"):
            reasons.append(f"serves CUDA tensors, got {device}")
        if request.op not in self.SUPPORTED_DTYPES:
            reasons.append(f"there is no Triton kernel for {request.op} yet")
        elif request.dtype in FLOAT_DTYPES and request.dtype not in self.SUPPORTED_DTYPES[request.op]:
            reasons.append(f"the Triton {request.op} kernels do not take {request.dtype}")
        if device == "cuda" and request.dtype == torch.bfloat16:
            reasons += _bf16_capability_reasons(request.device)
        if request.op == "varlen_attention" and request.dropout_p > 0.0:
            reasons.append(f"varlen attention dropout (dropout_p={request.dropout_p}) has no fused Triton kernel yet")
        if request.op.startswith("add_") and request.dropout_p > 0.0:
            reasons.append(f"{request.op}'s dropout (dropout_p={request.dropout_p}) has no fused Triton kernel yet")
        return reasons + _common_reasons(request)


class ReferenceBackend:
    name = "reference"

    def not_supported_reasons(self, request: Request) -> list[str]:
        return []


_BACKENDS = {"cpp": CppBackend(), "triton": TritonBackend(), "reference": ReferenceBackend()}
_PRIORITY = ("cpp", "triton")
_warned: set[str] = set()


@dataclasses.dataclass
class Explanation:
    """The backend that serves a call, and each other backend's reasons for not serving it."""

    op: str
    backend: str
    reasons: dict[str, list[str]]
    forced: bool = False
    detail: str = ""  # how the serving backend runs it (the CPU attention's product engine)

    def __str__(self) -> str:
        how = "forced by FUSEDFORMER_BACKEND" if self.forced else "chosen automatically"
        lines = [f"{self.op}: served by {self.backend!r} ({how})"]
        if self.detail:
            lines.append(f"  {self.backend}: {self.detail}")
        for name, why in self.reasons.items():
            if name != self.backend and why:
                lines.append(f"  {name}: " + "; ".join(why))
        return "\n".join(lines)


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype torch's autocast computes its lower-precision ops (linear, matmul, scaled dot-product
    attention) of ``t`` in, or None: autocast off for ``t``'s device, or ``t`` not a tensor autocast casts
    (not floating, float64) or already in that dtype."""
    device = t.device.type
    if not torch.is_autocast_enabled(device) or not t.is_floating_point() or t.dtype == torch.float64:
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if t.dtype == dtype else dtype


def autocast_cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` as autocast would hand it to a lower-precision op: floating tensors but float64 in ``dtype``."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _forced_backend() -> str | None:
    forced = os.environ.get("FUSEDFORMER_BACKEND", "").strip().lower()
    if not forced:
        return None
    if forced not in BACKENDS:
        raise ValueError(f"FUSEDFORMER_BACKEND must be one of {', '.join(BACKENDS)}; got {forced!r}")
    return forced


def _strict() -> bool:
    return os.environ.get("FUSEDFORMER_STRICT", "").strip() not in ("", "0", "false", "False")


def cpu_matmul_engines(dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")) -> dict[str, str]:
    """The engine that runs the CPU attention's tile products, per dtype name; ``{}`` without ``_C``.

    ``"onednn-brgemm-bf16-vnni"`` (oneDNN's batch-reduce GEMM on bf16 tiles: AMX where the CPU has
    it), ``"onednn-brgemm-f32"`` (oneDNN in float32, half types converted tile by tile) or ``"native"``
    (fusedformer's own micro-kernel). Chosen by measuring the candidates once per process and dtype, at
    first use (a few ms), unless ``FUSEDFORMER_CPU_MATMUL=native|brgemm-f32|brgemm`` forces one.
    """
    if _C is None:
        return {}
    return {d: _C.attention_engine(d)["fwd"] for d in dtypes}


def _detail(request: Request, backend: str) -> str:
    # Never measures: explain runs no kernel (and a process that forks later, like the benchmarks'
    # memory probe, must not have started torch's OpenMP pool).
    if backend != "cpp" or request.op not in ("attention", "varlen_attention") or request.dtype not in FLOAT_DTYPES:
        # (attention_with_kv_cache runs the decode kernel, or the attention forward for a uniform prefill)
        return ""
    info = _C.attention_engine(str(request.dtype).removeprefix("torch."), measure=False)
    if not info["fwd"]:
        return f"tile products on the fastest of {', '.join(info['candidates'])}, measured at first use"
    small = info.get("native_up_to", 0)
    tail = f"; calls of at most {small} scores per head (L x S) on native, the measured crossover" if small else ""
    text = f"tile products on {info['fwd']} ({info['how']}){tail}"
    if request.op == "attention":  # varlen's forward always sums its scores the backward's way
        small = info.get("inference_native_up_to", 0)
        tail = f", at most {small} scores per head on native" if small else ""
        text += f"; a forward with no input needing a gradient: {info['inference']}, scores in its own sums{tail}"
    return text


def explain_request(request: Request) -> Explanation:
    """Which backend would serve ``request`` (without raising or warning)."""
    reasons = {name: backend.not_supported_reasons(request) for name, backend in _BACKENDS.items()}
    forced = _forced_backend()
    if forced is not None:
        chosen = forced
    else:
        chosen = next((name for name in _PRIORITY if not reasons[name]), "reference")
    detail = _detail(request, chosen) if not reasons[chosen] else ""
    if chosen == "cpp" and _MISMATCH is not None:
        detail = f"WARNING: {_MISMATCH}" + (f"; {detail}" if detail else "")
    return Explanation(request.op, chosen, reasons, forced=forced is not None, detail=detail)


def _format_reasons(reasons: dict[str, list[str]], names) -> str:
    return "; ".join(f"{name}: " + ", ".join(reasons[name]) for name in names if reasons[name])


def forbid_double_backward(op: str) -> None:
    """Registers autograd for a ``*_bwd`` op that raises: a gradient of a gradient through it would be
    silently wrong (torch only warns), so it is an error, raised when that double backward runs."""

    def _backward(ctx, *grads):
        raise NotImplementedError(f"{op}: double backward (a gradient of a gradient) is not supported")

    torch.library.register_autograd(op, _backward, setup_context=lambda ctx, inputs, output: None)


def register_triton_op(qualname: str, launcher, schema: str, fake) -> None:
    """Registers a Triton launcher of ``fusedformer/kernels/`` as the custom op ``qualname``.

    Compiled for a GPU it is a ``torch.library.triton_op``: torch.compile sees the kernels inside
    (``wrap_triton``) and derives the fake kernel by tracing the launcher. Under the interpreter
    ``wrap_triton`` hands back the kernel itself, so that tracing would run it on fake tensors; there the
    op is an opaque ``torch.library.custom_op`` with the op family's explicit fake kernel ``fake`` (the
    one its cpp op uses), and torch.compile calls it like any other extern op.
    """
    if TRITON_INTERPRETED:
        op = torch.library.custom_op(qualname, launcher, mutates_args=(), schema=schema)
        op.register_fake(fake)
    else:
        torch.library.triton_op(qualname, launcher, mutates_args=(), schema=schema)


def report_fallback(what: str, reason: str) -> None:
    """Says once that ``what`` runs on the reference path because ``reason``, or raises where forbidden.

    The one rule for every fallback, here and in ``fusedformer.nn``: a forced fused backend
    (``FUSEDFORMER_BACKEND=cpp|triton``) and ``FUSEDFORMER_STRICT=1`` raise; otherwise a one-time
    ``FallbackWarning``.
    """
    forced = _forced_backend()
    if forced is not None and forced != "reference":
        raise BackendUnavailableError(f"fusedformer: FUSEDFORMER_BACKEND={forced} cannot serve {what}: {reason}")
    if _strict():
        raise BackendUnavailableError(
            f"fusedformer: no fused kernel can serve {what} and FUSEDFORMER_STRICT=1 forbids the reference path "
            f"({reason})"
        )
    message = f"fusedformer: {what} runs on the reference path (plain PyTorch) because {reason}"
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, FallbackWarning, stacklevel=4)


def call(op, *args):
    """``op(*args)``; below the autograd key when no tensor argument needs a gradient (inference).

    torch.library registers the ops' autograd in Python: every call through the Autograd key runs a
    Python wrapper (~10 us) even under ``torch.no_grad()``, which small inference calls feel. Under
    torch.compile the op is called as is (the guard is not traceable, and the graph pays no such cost).
    """
    # under torch.compile as is; under inference_mode the Autograd keys are off already: nothing to skip
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


_SELECTED: dict[tuple, str] = {}
_FUSED_OPS: dict[str, object] = {}


def fused_op(name: str):
    """``torch.ops.fusedformer.<name>.default``, resolved once (the attribute walk costs ~1 us a call)."""
    op = _FUSED_OPS.get(name)
    if op is None:
        op = _FUSED_OPS[name] = getattr(torch.ops.fusedformer, name).default
    return op

# CPython's dict of bytes behind os.environ on POSIX, which os.environ[...] = and del keep current:
# reading it takes ~0.05 us where os.environ.get takes ~0.7 (its key encoding), twice on every call
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _env_state() -> tuple:
    """The environment variables that steer selection (FUSEDFORMER_BACKEND, FUSEDFORMER_STRICT)."""
    if isinstance(_ENVIRON_BYTES, dict):
        return (_ENVIRON_BYTES.get(b"FUSEDFORMER_BACKEND"), _ENVIRON_BYTES.get(b"FUSEDFORMER_STRICT"))
    return (os.environ.get("FUSEDFORMER_BACKEND"), os.environ.get("FUSEDFORMER_STRICT"))


def select(request: Request) -> str:
    """The name of the backend that serves ``request``; raises or warns as the module doc says.

    On every call: asks only the backends it needs (the forced one, or the priority list up to the
    first that fits); every backend's reasons are gathered only for a fallback's message.
    """
    env = _env_state()
    chosen = _SELECTED.get((request, env))
    if chosen is not None:  # a fused backend served this kind of call before, in this environment
        return chosen
    chosen = _select(request)
    # a fallback warns or raises again, as the environment says. Not cached while torch.compile traces:
    # the store would be a side effect Dynamo must replay after the graph, rebuilding the Request (a
    # frozen dataclass) made inside it, which it cannot do (fullgraph=True then fails)
    if chosen != "reference" and not torch.compiler.is_compiling():
        _SELECTED[(request, env)] = chosen
    return chosen


def _select(request: Request) -> str:
    forced = _forced_backend()
    if forced is not None:
        why = _BACKENDS[forced].not_supported_reasons(request)
        if why:
            raise BackendUnavailableError(
                f"fusedformer: FUSEDFORMER_BACKEND={forced} cannot serve this {request.op} call: " + "; ".join(why)
            )
        return forced
    for name in _PRIORITY:
        if not _BACKENDS[name].not_supported_reasons(request):
            return name
    reasons = {name: _BACKENDS[name].not_supported_reasons(request) for name in _PRIORITY}
    report_fallback(f"this {request.op} call", _format_reasons(reasons, _PRIORITY))
    return "reference"
