"""Residual add + norm (``add_layer_norm``, ``add_rms_norm``): public functions, typed op wrappers, fake
kernels, autograd.

    residual_out = dropout(input) + residual        # rounded to the dtype, as the composite
    output       = norm(residual_out)
    d residual   = d residual_out + norm'(d output)  # both outputs carry gradient
    d input      = d residual · keep / (1 - p)

The backward is given residual_out (saved from the forward), not input and residual, and draws the
dropout mask again from (seed, row, column) (csrc/cpu/kernels/dropout.h): no mask is stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedformer import backends, reference
from fusedformer.ops import sharding
from fusedformer.ops.attention import _dropout_seed_value
from fusedformer.ops.layer_norm import check_norm_args, stats_dtype
from fusedformer.ops.rms_norm import default_eps

__all__ = ["add_layer_norm", "add_rms_norm", "add_norm_dropout_mask"]

_EXTRA = "float dropout_p=0.0, int seed=0"
_SCHEMAS = {
    "add_layer_norm": (
        "(Tensor input, Tensor residual, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps, "
        f"{_EXTRA}) -> (Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)",
        "(Tensor grad_out, Tensor? grad_residual_out, Tensor residual_out, int[] normalized_shape, Tensor mean, "
        f"Tensor rstd, Tensor? weight, Tensor? bias, {_EXTRA}) "
        "-> (Tensor grad_residual, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
    ),
    "add_rms_norm": (
        "(Tensor input, Tensor residual, int[] normalized_shape, Tensor? weight, float eps, "
        f"{_EXTRA}) -> (Tensor out, Tensor residual_out, Tensor rstd)",
        "(Tensor grad_out, Tensor? grad_residual_out, Tensor residual_out, int[] normalized_shape, Tensor rstd, "
        f"Tensor? weight, {_EXTRA}) -> (Tensor grad_residual, Tensor grad_input, Tensor grad_weight)",
    ),
}


def add_norm_dropout_mask(rows: int, cols: int, dropout_p: float, seed: int) -> torch.Tensor:  # (rows, cols)
    """The mask ``add_*_norm_fwd(..., dropout_p, seed)`` applies to an input of ``(rows, cols)`` (the input
    viewed as rows of ``D1·…·Dk``): bool, True = kept. For tests; the kernels never build it."""
    return torch.ops.fusedformer.add_norm_dropout_mask.default(rows, cols, dropout_p, seed)


def _op_name(family: str, backend: str, half: str) -> str:
    return f"{family}_{half}" if backend == "cpp" else f"triton_{family}_{half}"


def _register_autograd(family: str, backend: str) -> None:
    rms = family == "add_rms_norm"
    fwd_name, bwd_name = _op_name(family, backend, "fwd"), _op_name(family, backend, "bwd")

    def _setup_context(ctx, inputs, output):
        # an unused output's gradient arrives as None (not materialised zeros: under DTensor those would
        # be plain tensors beside DTensors)
        ctx.set_materialize_grads(False)
        if rms:
            input, residual, normalized_shape, weight, eps, dropout_p, seed = inputs
            _, residual_out, rstd = output
            ctx.mark_non_differentiable(rstd)
            ctx.save_for_backward(residual_out, rstd, weight)
            ctx.has_bias = False
        else:
            input, residual, normalized_shape, weight, bias, eps, dropout_p, seed = inputs
            _, residual_out, mean, rstd = output
            ctx.mark_non_differentiable(mean, rstd)  # statistics saved for the backward, not results
            ctx.save_for_backward(residual_out, mean, rstd, weight, bias)
        ctx.normalized_shape, ctx.dropout_p, ctx.seed = normalized_shape, dropout_p, seed

    def _backward(ctx, grad_out, grad_residual_out, *grad_stats):
        bwd = getattr(torch.ops.fusedformer, bwd_name).default
        shape = list(ctx.normalized_shape)
        if rms:
            residual_out, rstd, weight = ctx.saved_tensors
        else:
            residual_out, mean, rstd, weight, bias = ctx.saved_tensors
        if grad_out is None:  # only residual_out was used
            grad_out = torch.zeros_like(residual_out)
        if rms:
            dres, dinput, dw = bwd(
                grad_out, grad_residual_out, residual_out, shape, rstd, weight, ctx.dropout_p, ctx.seed
            )
            grads = (dw if weight is not None else None,)
        else:
            dres, dinput, dw, db = bwd(
                grad_out, grad_residual_out, residual_out, shape, mean, rstd, weight, bias, ctx.dropout_p, ctx.seed
            )
            grads = (dw if weight is not None else None, db if bias is not None else None)
        # without dropout the input's gradient is the residual's (the op returns it once)
        dinput = dinput if ctx.dropout_p > 0.0 else dres
        return (dinput, dres, None, *grads, None, None, None)

    torch.library.register_autograd(f"fusedformer::{fwd_name}", _backward, setup_context=_setup_context)
    backends.forbid_double_backward(f"fusedformer::{bwd_name}")


def _lead(input, normalized_shape):
    return input.shape[: input.dim() - len(normalized_shape)]


def _add_layer_norm_fwd_fake(input, residual, normalized_shape, weight, bias, eps, dropout_p=0.0, seed=0):
    stats = input.new_empty(_lead(input, normalized_shape), dtype=stats_dtype(input.dtype))
    return input.new_empty(input.shape), input.new_empty(input.shape), stats, torch.empty_like(stats)


def _add_layer_norm_bwd_fake(
    grad_out, grad_residual_out, residual_out, normalized_shape, mean, rstd, weight, bias, dropout_p=0.0, seed=0
):
    x = residual_out
    gw = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    gb = bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,))
    gi = x.new_empty(x.shape) if dropout_p > 0.0 else x.new_empty((0,))
    return x.new_empty(x.shape), gi, gw, gb


def _add_rms_norm_fwd_fake(input, residual, normalized_shape, weight, eps, dropout_p=0.0, seed=0):
    rstd = input.new_empty(_lead(input, normalized_shape), dtype=stats_dtype(input.dtype))
    return input.new_empty(input.shape), input.new_empty(input.shape), rstd


def _add_rms_norm_bwd_fake(
    grad_out, grad_residual_out, residual_out, normalized_shape, rstd, weight, dropout_p=0.0, seed=0
):
    x = residual_out
    gw = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    gi = x.new_empty(x.shape) if dropout_p > 0.0 else x.new_empty((0,))
    return x.new_empty(x.shape), gi, gw


_FAKES = {
    "add_layer_norm": (_add_layer_norm_fwd_fake, _add_layer_norm_bwd_fake),
    "add_rms_norm": (_add_rms_norm_fwd_fake, _add_rms_norm_bwd_fake),
}


def _register_cpp() -> None:
    for family, (fwd_fake, bwd_fake) in _FAKES.items():
        torch.library.register_fake(f"fusedformer::{family}_fwd", fwd_fake)
        torch.library.register_fake(f"fusedformer::{family}_bwd", bwd_fake)

    @torch.library.register_fake("fusedformer::add_norm_dropout_mask")
    def _add_norm_dropout_mask_fake(rows, cols, dropout_p, seed):
        return torch.empty((rows, cols), dtype=torch.bool)

    for family in _SCHEMAS:
        _register_autograd(family, "cpp")


def _register_triton(kernels) -> None:
    # see backends.register_triton_op: a triton_op on a GPU, an opaque op with the fake when interpreted
    launchers = {
        "add_layer_norm": (kernels.add_layer_norm_forward, kernels.add_layer_norm_backward),
        "add_rms_norm": (kernels.add_rms_norm_forward, kernels.add_rms_norm_backward),
    }
    for family, (fwd_schema, bwd_schema) in _SCHEMAS.items():
        fwd, bwd = launchers[family]
        fwd_fake, bwd_fake = _FAKES[family]
        backends.register_triton_op(f"fusedformer::triton_{family}_fwd", fwd, fwd_schema, fwd_fake)
        backends.register_triton_op(f"fusedformer::triton_{family}_bwd", bwd, bwd_schema, bwd_fake)
        _register_autograd(family, "triton")


if backends._C is not None:
    _register_cpp()
if backends.TRITON_KERNELS:
    _register_triton(backends.TRITON_KERNELS["layer_norm"])


def _check(fn, input, residual, normalized_shape, params, eps, dropout_p):
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{fn}: expected residual to be a Tensor, got {type(residual).__name__}")
    shape = check_norm_args(fn, input, normalized_shape, {"residual": residual, **params}, eps)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: expected dropout_p in [0, 1), got {dropout_p}")
    return shape


def _request_layer(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5, dropout_p=0.0):
    _check("fusedformer.add_layer_norm", input, residual, normalized_shape, {"weight": weight, "bias": bias}, eps,
           dropout_p)  # fmt: skip
    return backends.Request("add_layer_norm", input.device, input.dtype, dropout_p=float(dropout_p))


def _request_rms(input, residual, normalized_shape, weight=None, eps=None, dropout_p=0.0):
    _check("fusedformer.add_rms_norm", input, residual, normalized_shape, {"weight": weight}, eps, dropout_p)
    return backends.Request("add_rms_norm", input.device, input.dtype, dropout_p=float(dropout_p))


def _extra(dropout_p: float) -> tuple:
    return (float(dropout_p), _dropout_seed_value()) if dropout_p > 0.0 else ()


def add_layer_norm(
    input: torch.Tensor,  # (*, D1..Dk)
    residual: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: int | Sequence[int],  # (D1..Dk)
    weight: torch.Tensor | None = None,  # (D1..Dk)
    bias: torch.Tensor | None = None,  # (D1..Dk)
    eps: float = 1e-5,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # output, residual_out: (*, D1..Dk)
    """``h = dropout(input) + residual; (F.layer_norm(h, ...), h)`` in one pass over each row.

    Args:
        input: ``(*, D1..Dk)``, the branch output (attention, MLP) to add; dropped with ``dropout_p``.
        residual: ``(*, D1..Dk)``, input's dtype and device.
        normalized_shape, weight, bias, eps: as ``F.layer_norm``.
        dropout_p: dropout on ``input`` before the add (FlashAttention's ``dropout_add_layer_norm``), kept
            elements scaled by ``1 / (1 - dropout_p)``; applied whenever ``dropout_p > 0`` (pass 0 in
            eval). The cpp backend fuses it: the mask is a counter-based hash of (seed, row, column), the
            seed drawn from torch's default CPU generator (``torch.manual_seed`` reproduces it; the draw
            differs from torch's dropout), and the backward draws it again. The Triton backend has no
            dropout: it falls back to the reference path (torch's dropout) with a warning.

    Returns ``(output, residual_out)``, both ``(*, D1..Dk)`` in input's dtype: ``residual_out = h``
    rounded to the dtype (what the next block adds to) and ``output = layer_norm(residual_out)``.
    Gradients flow through both.

    Tensor parallel (DTensor inputs; ops ``add_layer_norm_fwd`` / ``_bwd``): input and residual sharded
    alike on any dim but the normalised ones, weight and bias replicated; the outputs and input gradients
    shard alike, grad_weight and grad_bias are ``Partial()`` sums. With dropout, every shard draws the mask
    of its local (row, column) from the one seed.
    """
    request = _request_layer(input, residual, normalized_shape, weight, bias, eps, dropout_p)
    backend = backends.select(request)
    if backend == "reference":
        return reference.add_layer_norm(input, residual, normalized_shape, weight, bias, eps, dropout_p)
    shape = check_norm_args("fusedformer.add_layer_norm", input, normalized_shape, {}, eps)
    fwd = getattr(torch.ops.fusedformer, _op_name("add_layer_norm", backend, "fwd")).default
    out, residual_out, _, _ = fwd(input, residual, list(shape), weight, bias, float(eps), *_extra(dropout_p))
    return out, residual_out


def add_rms_norm(
    input: torch.Tensor,  # (*, D1..Dk)
    residual: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: int | Sequence[int],  # (D1..Dk)
    weight: torch.Tensor | None = None,  # (D1..Dk)
    eps: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # output, residual_out: (*, D1..Dk)
    """``h = dropout(input) + residual; (F.rms_norm(h, ...), h)`` in one pass over each row.

    As :func:`add_layer_norm`, with ``F.rms_norm``'s ``eps`` (None means ``torch.finfo(input.dtype).eps``)
    and no bias.

    Tensor parallel (DTensor inputs; ops ``add_rms_norm_fwd`` / ``_bwd``): as ``add_layer_norm``.
    """
    request = _request_rms(input, residual, normalized_shape, weight, eps, dropout_p)
    backend = backends.select(request)
    eps = default_eps(input.dtype, eps)
    if backend == "reference":
        return reference.add_rms_norm(input, residual, normalized_shape, weight, eps, dropout_p)
    shape = check_norm_args("fusedformer.add_rms_norm", input, normalized_shape, {}, eps)
    fwd = getattr(torch.ops.fusedformer, _op_name("add_rms_norm", backend, "fwd")).default
    out, residual_out, _ = fwd(input, residual, list(shape), weight, eps, *_extra(dropout_p))
    return out, residual_out


# ---- DTensor sharding rules (tensor parallelism; see ops/sharding.py) ----------------------------
# Rows are independent: shard on any dim but the normalised ones; weight and bias replicated, their
# gradients partial sums. With dropout, each shard draws the mask of its local (row, column) indices
# from the one seed: shards repeat one pattern (each element is still kept with probability 1 - p).


def _w(t, token: str) -> str | None:
    return token if t is not None else None


def _grad(t) -> str:
    return "P" if t is not None else "R"  # an absent weight's gradient is an empty, replicated tensor


@sharding.rules("add_layer_norm_fwd", "triton_add_layer_norm_fwd")
def _add_layer_norm_fwd_rules(input, residual, normalized_shape, weight, bias, eps, dropout_p=0.0, seed=0):
    return sharding.row_layouts(
        input.ndim - len(normalized_shape), ["S"] * 4,
        ["S", "S", None, _w(weight, "R"), _w(bias, "R"), None, None, None],
    )


@sharding.rules("add_layer_norm_bwd", "triton_add_layer_norm_bwd")
def _add_layer_norm_bwd_rules(grad_out, grad_residual_out, residual_out, normalized_shape, mean, rstd, weight, bias,
                              dropout_p=0.0, seed=0):
    return sharding.row_layouts(
        residual_out.ndim - len(normalized_shape), ["S", "S" if dropout_p > 0 else "R", _grad(weight), _grad(bias)],
        ["S", _w(grad_residual_out, "S"), "S", None, "S", "S", _w(weight, "R"), _w(bias, "R"), None, None],
    )


@sharding.rules("add_rms_norm_fwd", "triton_add_rms_norm_fwd")
def _add_rms_norm_fwd_rules(input, residual, normalized_shape, weight, eps, dropout_p=0.0, seed=0):
    return sharding.row_layouts(
        input.ndim - len(normalized_shape), ["S"] * 3, ["S", "S", None, _w(weight, "R"), None, None, None],
    )


@sharding.rules("add_rms_norm_bwd", "triton_add_rms_norm_bwd")
def _add_rms_norm_bwd_rules(grad_out, grad_residual_out, residual_out, normalized_shape, rstd, weight,
                            dropout_p=0.0, seed=0):
    return sharding.row_layouts(
        residual_out.ndim - len(normalized_shape), ["S", "S" if dropout_p > 0 else "R", _grad(weight)],
        ["S", _w(grad_residual_out, "S"), "S", None, "S", _w(weight, "R"), None, None],
    )
