"""RMSNorm: the public function, the typed op wrappers, fake kernels, autograd."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedformer import backends, reference
from fusedformer.ops import sharding
from fusedformer.ops.layer_norm import check_norm_args, stats_dtype

__all__ = ["rms_norm", "rms_norm_fwd", "rms_norm_bwd", "default_eps"]

_FN = "fusedformer.rms_norm"


def rms_norm_fwd(
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: Sequence[int],  # (D1..Dk)
    weight: torch.Tensor | None,  # (D1..Dk)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # out (*, D1..Dk), rstd (*)
    return torch.ops.fusedformer.rms_norm_fwd.default(input, list(normalized_shape), weight, eps)


def rms_norm_bwd(
    grad_out: torch.Tensor,  # (*, D1..Dk)
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: Sequence[int],
    rstd: torch.Tensor,  # (*)
    weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # grad_input, grad_weight (empty if None)
    return torch.ops.fusedformer.rms_norm_bwd.default(grad_out, input, list(normalized_shape), rstd, weight)


def default_eps(dtype: torch.dtype, eps: float | None) -> float:
    """``eps``, or ``torch.finfo(dtype).eps`` where it is None (``F.rms_norm``'s default)."""
    return float(torch.finfo(dtype).eps) if eps is None else float(eps)


_FWD_SCHEMA = "(Tensor input, int[] normalized_shape, Tensor? weight, float eps) -> (Tensor out, Tensor rstd)"
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor rstd, Tensor? weight) "
    "-> (Tensor grad_input, Tensor grad_weight)"
)
# The op pair that serves each backend (the cpp pair from csrc/fusedformer.cpp, the triton pair below).
_OPS = {"cpp": ("rms_norm_fwd", "rms_norm_bwd"), "triton": ("triton_rms_norm_fwd", "triton_rms_norm_bwd")}


def _register_autograd(backend: str) -> None:
    fwd_name, bwd_name = _OPS[backend]

    def _setup_context(ctx, inputs, output):
        input, normalized_shape, weight, eps = inputs
        _, rstd = output
        ctx.mark_non_differentiable(rstd)  # saved for the backward, not a result
        ctx.save_for_backward(input, rstd, weight)
        ctx.normalized_shape = normalized_shape

    def _backward(ctx, grad_out, grad_rstd):
        input, rstd, weight = ctx.saved_tensors
        bwd = getattr(torch.ops.fusedformer, bwd_name).default
        dx, dw = bwd(grad_out, input, list(ctx.normalized_shape), rstd, weight)
        return dx, None, dw if weight is not None else None, None

    torch.library.register_autograd(f"fusedformer::{fwd_name}", _backward, setup_context=_setup_context)
    backends.forbid_double_backward(f"fusedformer::{bwd_name}")


def _rms_norm_fwd_fake(input, normalized_shape, weight, eps):
    lead = input.shape[: input.dim() - len(normalized_shape)]
    return input.new_empty(input.shape), input.new_empty(lead, dtype=stats_dtype(input.dtype))


def _rms_norm_bwd_fake(grad_out, input, normalized_shape, rstd, weight):
    gw = weight.new_empty(weight.shape) if weight is not None else input.new_empty((0,))
    return input.new_empty(input.shape), gw


def _register_cpp() -> None:
    torch.library.register_fake("fusedformer::rms_norm_fwd", _rms_norm_fwd_fake)
    torch.library.register_fake("fusedformer::rms_norm_bwd", _rms_norm_bwd_fake)
    _register_autograd("cpp")


def _register_triton(kernels) -> None:
    # see backends.register_triton_op: a triton_op on a GPU, an opaque op with this fake when interpreted
    backends.register_triton_op(
        "fusedformer::triton_rms_norm_fwd", kernels.rms_norm_forward, _FWD_SCHEMA, _rms_norm_fwd_fake
    )
    backends.register_triton_op(
        "fusedformer::triton_rms_norm_bwd", kernels.rms_norm_backward, _BWD_SCHEMA, _rms_norm_bwd_fake
    )
    _register_autograd("triton")


if backends._C is not None:
    _register_cpp()
if backends.TRITON_KERNELS:
    _register_triton(backends.TRITON_KERNELS["layer_norm"])


def _request(input, normalized_shape, weight=None, eps=None):
    check_norm_args(_FN, input, normalized_shape, {"weight": weight}, eps)
    return backends.Request("rms_norm", input.device, input.dtype)


def rms_norm(
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: int | Sequence[int],  # (D1..Dk)
    weight: torch.Tensor | None = None,  # (D1..Dk)
    eps: float | None = None,
) -> torch.Tensor:  # (*, D1..Dk)
    """``F.rms_norm``, fused: ``input / sqrt(mean(input²) + eps) · weight`` in one pass over each row.

    Normalises over the last ``len(normalized_shape)`` dims; the mean of squares and all math in float32
    (float64 for float64), the result rounded once to input's dtype. ``eps=None`` means
    ``torch.finfo(input.dtype).eps``, as ``F.rms_norm``. ``weight`` (optional) has input's dtype.

    Tensor parallel (DTensor inputs; ops ``rms_norm_fwd`` / ``rms_norm_bwd``): input sharded on any dim but
    the normalised ones, weight replicated; out, rstd and grad_input shard alike, grad_weight is a
    ``Partial()`` sum. Input sharded on a normalised dim is gathered with a one-time ``ShardingWarning``.
    """
    request = _request(input, normalized_shape, weight, eps)
    backend = backends.select(request)
    eps = default_eps(input.dtype, eps)
    if backend == "reference":
        return reference.rms_norm(input, normalized_shape, weight, eps)
    shape = check_norm_args(_FN, input, normalized_shape, {}, eps)
    fwd = backends.fused_op(_OPS[backend][0])
    out, _ = fwd(input, list(shape), weight, eps)
    return out


# ---- DTensor sharding rules (tensor parallelism; see ops/sharding.py) ----------------------------
# Rows are independent: shard on any dim but the normalised ones; weight replicated, its gradient a
# partial sum over each shard's rows.


def _w(t, token: str) -> str | None:
    return token if t is not None else None


@sharding.rules("rms_norm_fwd", "triton_rms_norm_fwd")
def _rms_norm_fwd_rules(input, normalized_shape, weight, eps):
    return sharding.row_layouts(input.ndim - len(normalized_shape), ["S", "S"], ["S", None, _w(weight, "R"), None])


@sharding.rules("rms_norm_bwd", "triton_rms_norm_bwd")
def _rms_norm_bwd_rules(grad_out, input, normalized_shape, rstd, weight):
    return sharding.row_layouts(
        input.ndim - len(normalized_shape), ["S", "P" if weight is not None else "R"],
        ["S", "S", None, "S", _w(weight, "R")],
    )
