"""LayerNorm: the public function, the typed op wrappers, fake kernels, autograd."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedformer import backends, reference
from fusedformer.ops import sharding

__all__ = ["layer_norm", "layer_norm_fwd", "layer_norm_bwd", "check_norm_args", "stats_dtype"]

_FN = "fusedformer.layer_norm"


def layer_norm_fwd(
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: Sequence[int],  # (D1..Dk)
    weight: torch.Tensor | None,  # (D1..Dk)
    bias: torch.Tensor | None,  # (D1..Dk)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # out (*, D1..Dk), mean (*), rstd (*)
    return torch.ops.fusedformer.layer_norm_fwd.default(input, list(normalized_shape), weight, bias, eps)


def layer_norm_bwd(
    grad_out: torch.Tensor,  # (*, D1..Dk)
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: Sequence[int],
    mean: torch.Tensor,  # (*)
    rstd: torch.Tensor,  # (*)
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # grad_input, grad_weight, grad_bias (empty if None)
    return torch.ops.fusedformer.layer_norm_bwd.default(
        grad_out, input, list(normalized_shape), mean, rstd, weight, bias
    )


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_FWD_SCHEMA = (
    "(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
    "-> (Tensor out, Tensor mean, Tensor rstd)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor mean, Tensor rstd, Tensor? weight, "
    "Tensor? bias) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)"
)
# The op pair that serves each backend (the cpp pair from csrc/fusedformer.cpp, the triton pair below).
_OPS = {"cpp": ("layer_norm_fwd", "layer_norm_bwd"), "triton": ("triton_layer_norm_fwd", "triton_layer_norm_bwd")}


def _register_autograd(backend: str) -> None:
    fwd_name, bwd_name = _OPS[backend]

    def _setup_context(ctx, inputs, output):
        input, normalized_shape, weight, bias, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)  # statistics saved for the backward, not results
        ctx.save_for_backward(input, mean, rstd, weight, bias)
        ctx.normalized_shape = normalized_shape

    def _backward(ctx, grad_out, grad_mean, grad_rstd):
        input, mean, rstd, weight, bias = ctx.saved_tensors
        bwd = getattr(torch.ops.fusedformer, bwd_name).default
        dx, dw, db = bwd(grad_out, input, list(ctx.normalized_shape), mean, rstd, weight, bias)
        return dx, None, dw if weight is not None else None, db if bias is not None else None, None

    torch.library.register_autograd(f"fusedformer::{fwd_name}", _backward, setup_context=_setup_context)
    backends.forbid_double_backward(f"fusedformer::{bwd_name}")


def _layer_norm_fwd_fake(input, normalized_shape, weight, bias, eps):
    lead = input.shape[: input.dim() - len(normalized_shape)]
    stats = stats_dtype(input.dtype)
    mean, rstd = input.new_empty(lead, dtype=stats), input.new_empty(lead, dtype=stats)
    return input.new_empty(input.shape), mean, rstd


def _layer_norm_bwd_fake(grad_out, input, normalized_shape, mean, rstd, weight, bias):
    gw = weight.new_empty(weight.shape) if weight is not None else input.new_empty((0,))
    gb = bias.new_empty(bias.shape) if bias is not None else input.new_empty((0,))
    return input.new_empty(input.shape), gw, gb


def _register_cpp() -> None:
    torch.library.register_fake("fusedformer::layer_norm_fwd", _layer_norm_fwd_fake)
    torch.library.register_fake("fusedformer::layer_norm_bwd", _layer_norm_bwd_fake)
    _register_autograd("cpp")


def _register_triton(kernels) -> None:
    # see backends.register_triton_op: a triton_op on a GPU, an opaque op with this fake when interpreted
    backends.register_triton_op(
        "fusedformer::triton_layer_norm_fwd", kernels.layer_norm_forward, _FWD_SCHEMA, _layer_norm_fwd_fake
    )
    backends.register_triton_op(
        "fusedformer::triton_layer_norm_bwd", kernels.layer_norm_backward, _BWD_SCHEMA, _layer_norm_bwd_fake
    )
    _register_autograd("triton")


if backends._C is not None:
    _register_cpp()
if backends.TRITON_KERNELS:
    _register_triton(backends.TRITON_KERNELS["layer_norm"])


# ---- DTensor sharding rules (tensor parallelism; see ops/sharding.py) ----------------------------
# Rows are independent: shard on any dim but the normalised ones; weight and bias replicated; their
# gradients are partial sums over the rows of each shard (Partial(), reduced when DTensor needs them).


@sharding.rules("layer_norm_fwd", "triton_layer_norm_fwd")
def _layer_norm_fwd_rules(input, normalized_shape, weight, bias, eps):
    from torch.distributed.tensor import Replicate, Shard

    params = [Replicate() if t is not None else None for t in (weight, bias)]
    layouts = [sharding.replicated(3, 5, (input, None, weight, bias, None))]
    for d in range(input.ndim - len(normalized_shape)):
        layouts.append(([Shard(d)] * 3, [Shard(d), None, *params, None]))
    return layouts


@sharding.rules("layer_norm_bwd", "triton_layer_norm_bwd")
def _layer_norm_bwd_rules(grad_out, input, normalized_shape, mean, rstd, weight, bias):
    from torch.distributed.tensor import Partial, Replicate, Shard

    params = [Replicate() if t is not None else None for t in (weight, bias)]
    grads = [Partial() if t is not None else Replicate() for t in (weight, bias)]  # empty where None
    layouts = [sharding.replicated(3, 7, (grad_out, input, None, mean, rstd, weight, bias))]
    for d in range(input.ndim - len(normalized_shape)):
        S = Shard(d)
        layouts.append(([S, *grads], [S, S, None, S, S, *params]))
    return layouts


def _normalize_shape(normalized_shape, fn: str = _FN) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    if type(normalized_shape) is tuple and len(normalized_shape) == 1 and type(normalized_shape[0]) is int:
        return normalized_shape  # nn.LayerNorm's own: no conversion on the hot path
    try:
        if isinstance(normalized_shape, str):
            raise TypeError
        shape = tuple(int(s) for s in normalized_shape)
    except (TypeError, ValueError):
        raise TypeError(
            f"{fn}: expected normalized_shape to be an int or a sequence of ints, got {normalized_shape!r}"
        ) from None
    return shape


def check_norm_args(fn: str, input, normalized_shape, params: dict, eps) -> tuple[int, ...]:
    """Validates a norm call's input, normalized_shape, parameters ({name: tensor or None}: weight, bias,
    residual, ...; each must have input's dtype and device) and eps; returns normalized_shape as a tuple.
    The parameters named weight and bias are (D1..Dk); any other is shaped like input."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}: expected input to be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{fn}: expected input to be a floating-point tensor, got {input.dtype}")
    shape = _normalize_shape(normalized_shape, fn)
    if len(shape) == 0 or input.dim() < len(shape) or input.shape[-len(shape) :] != shape:
        raise ValueError(
            f"{fn}: normalized_shape {list(shape)} does not match the last dims of input of shape {tuple(input.shape)}"
        )
    for name, t in params.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: expected {name} to be a Tensor or None, got {type(t).__name__}")
        want = shape if name in ("weight", "bias") else input.shape
        if t.shape != want:
            raise ValueError(f"{fn}: expected {name} of shape {list(want)}, got {tuple(t.shape)}")
        if t.dtype != input.dtype:
            raise TypeError(f"{fn}: expected {name} of dtype {input.dtype} like input, got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"{fn}: expected {name} on {input.device} like input, got {t.device}")
    if eps is not None and not eps >= 0:
        raise ValueError(f"{fn}: expected eps >= 0, got {eps}")
    return shape


def _request(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    check_norm_args(_FN, input, normalized_shape, {"weight": weight, "bias": bias}, eps)
    return backends.Request("layer_norm", input.device, input.dtype)


def layer_norm(
    input: torch.Tensor,  # (*, D1..Dk)
    normalized_shape: int | Sequence[int],  # (D1..Dk)
    weight: torch.Tensor | None = None,  # (D1..Dk)
    bias: torch.Tensor | None = None,  # (D1..Dk)
    eps: float = 1e-5,
) -> torch.Tensor:  # (*, D1..Dk)
    """``F.layer_norm``, fused: one pass over each row, statistics in float32 (float64 for float64).

    Normalises over the last ``len(normalized_shape)`` dims with the biased variance, then applies the
    optional elementwise ``weight`` and ``bias``. Returns input's shape and dtype.

    Tensor parallel (DTensor inputs; ops ``layer_norm_fwd`` / ``layer_norm_bwd``): input sharded on any dim
    but the normalised ones (batch, or the sequence for sequence parallelism), weight and bias
    replicated; out, mean, rstd and grad_input shard alike, grad_weight and grad_bias are ``Partial()``
    sums. Input sharded on a normalised dim is gathered with a one-time ``ShardingWarning``.
    """
    shape = check_norm_args(_FN, input, normalized_shape, {"weight": weight, "bias": bias}, eps)  # as _request
    backend = backends.select(backends.Request("layer_norm", input.device, input.dtype))
    if backend == "reference":
        return reference.layer_norm(input, normalized_shape, weight, bias, eps)
    out, _, _ = backends.call(backends.fused_op(_OPS[backend][0]), input, list(shape), weight, bias, float(eps))
    return out
