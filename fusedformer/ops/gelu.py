"""GELU with a fused bias: the public function, the typed op wrappers, fake kernels, autograd."""

from __future__ import annotations

import torch

from fusedformer import backends, reference
from fusedformer.ops import sharding

__all__ = ["gelu", "gelu_fwd", "gelu_bwd"]

_FN = "fusedformer.gelu"


def gelu_fwd(
    input: torch.Tensor,  # (*, D)
    bias: torch.Tensor | None,  # (D,)
    approximate: str,  # "none" | "tanh"
) -> torch.Tensor:  # (*, D)
    return torch.ops.fusedformer.gelu_fwd.default(input, bias, approximate)


def gelu_bwd(
    grad_out: torch.Tensor,  # (*, D)
    input: torch.Tensor,  # (*, D)
    bias: torch.Tensor | None,  # (D,)
    approximate: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # grad_input (*, D), grad_bias (D,) or empty
    return torch.ops.fusedformer.gelu_bwd.default(grad_out, input, bias, approximate)


_FWD_SCHEMA = "(Tensor input, Tensor? bias, str approximate) -> Tensor"
_BWD_SCHEMA = "(Tensor grad_out, Tensor input, Tensor? bias, str approximate) -> (Tensor grad_input, Tensor grad_bias)"
# The op pair that serves each backend (the cpp pair from csrc/fusedformer.cpp, the triton pair below).
_OPS = {"cpp": ("gelu_fwd", "gelu_bwd"), "triton": ("triton_gelu_fwd", "triton_gelu_bwd")}


def _register_autograd(backend: str) -> None:
    fwd_name, bwd_name = _OPS[backend]

    def _setup_context(ctx, inputs, output):
        input, bias, approximate = inputs
        ctx.save_for_backward(input, bias)
        ctx.approximate = approximate

    def _backward(ctx, grad_out):
        input, bias = ctx.saved_tensors
        dx, db = getattr(torch.ops.fusedformer, bwd_name).default(grad_out, input, bias, ctx.approximate)
        return dx, db if bias is not None else None, None

    torch.library.register_autograd(f"fusedformer::{fwd_name}", _backward, setup_context=_setup_context)
    backends.forbid_double_backward(f"fusedformer::{bwd_name}")


def _gelu_fwd_fake(input, bias, approximate):
    return input.new_empty(input.shape)


def _gelu_bwd_fake(grad_out, input, bias, approximate):
    gb = bias.new_empty(bias.shape) if bias is not None else input.new_empty((0,))
    return input.new_empty(input.shape), gb


def _register_cpp() -> None:
    torch.library.register_fake("fusedformer::gelu_fwd", _gelu_fwd_fake)
    torch.library.register_fake("fusedformer::gelu_bwd", _gelu_bwd_fake)
    _register_autograd("cpp")


def _register_triton(kernels) -> None:
    # see backends.register_triton_op: a triton_op on a GPU, an opaque op with this fake when interpreted
    backends.register_triton_op(
        "fusedformer::triton_gelu_fwd", kernels.gelu_forward, _FWD_SCHEMA, _gelu_fwd_fake
    )
    backends.register_triton_op(
        "fusedformer::triton_gelu_bwd", kernels.gelu_backward, _BWD_SCHEMA, _gelu_bwd_fake
    )
    _register_autograd("triton")


if backends._C is not None:
    _register_cpp()
if backends.TRITON_KERNELS:
    _register_triton(backends.TRITON_KERNELS["gelu"])


# ---- DTensor sharding rules (tensor parallelism; see ops/sharding.py) ----------------------------
# Elementwise: shard on any dim. The bias (D,) is sliced along when the last dim is sharded (a
# column-parallel linear's output), else replicated, its gradient then a partial sum (Partial()).


@sharding.rules("gelu_fwd", "triton_gelu_fwd")
def _gelu_fwd_rules(input, bias, approximate):
    from torch.distributed.tensor import Replicate, Shard

    layouts = [sharding.replicated(1, 3, (input, bias, None))]
    for d in range(input.ndim):
        b = None if bias is None else Shard(0) if d == input.ndim - 1 else Replicate()
        layouts.append(([Shard(d)], [Shard(d), b, None]))
    return layouts


@sharding.rules("gelu_bwd", "triton_gelu_bwd")
def _gelu_bwd_rules(grad_out, input, bias, approximate):
    from torch.distributed.tensor import Partial, Replicate, Shard

    layouts = [sharding.replicated(2, 4, (grad_out, input, bias, None))]
    for d in range(input.ndim):
        last = d == input.ndim - 1
        b = None if bias is None else Shard(0) if last else Replicate()
        grad_b = Replicate() if bias is None else Shard(0) if last else Partial()  # empty where None
        layouts.append(([Shard(d), grad_b], [Shard(d), Shard(d), b, None]))
    return layouts


def _request(input, approximate="none", bias=None):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{_FN}: expected input to be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{_FN}: expected input to be a floating-point tensor, got {input.dtype}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{_FN}: expected approximate to be 'none' or 'tanh', got {approximate!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{_FN}: expected bias to be a Tensor or None, got {type(bias).__name__}")
        if input.dim() == 0 or tuple(bias.shape) != (input.shape[-1],):
            raise ValueError(
                f"{_FN}: expected bias of shape (D,) with D = input's last dim, got bias {tuple(bias.shape)} "
                f"for input {tuple(input.shape)}"
            )
        if bias.dtype != input.dtype:
            raise TypeError(f"{_FN}: expected bias of dtype {input.dtype} like input, got {bias.dtype}")
        if bias.device != input.device:
            raise ValueError(f"{_FN}: expected bias on {input.device} like input, got {bias.device}")
    return backends.Request("gelu", input.device, input.dtype)


def gelu(
    input: torch.Tensor,  # (*, D)
    approximate: str = "none",
    bias: torch.Tensor | None = None,  # (D,)
) -> torch.Tensor:  # (*, D)
    """``F.gelu(input + bias, approximate)`` in one pass; the bias add is fused in (and its gradient).

    ``approximate="none"`` is the exact ``x·Φ(x)`` (erf); ``"tanh"`` is the tanh approximation.

    Tensor parallel (DTensor inputs; ops ``gelu_fwd`` / ``gelu_bwd``): input sharded on any dim. Sharded on
    the last (a column-parallel linear's output) the bias is ``Shard(0)`` and so is its gradient;
    otherwise the bias is replicated and its gradient a ``Partial()`` sum.
    """
    request = _request(input, approximate, bias)
    backend = backends.select(request)
    if backend == "reference":
        return reference.gelu(input, approximate, bias)
    return backends.call(backends.fused_op(_OPS[backend][0]), input, bias, approximate)
