"""Linear layers on oneDNN's batch-reduce GEMM (float32, CPU): the op wrapper, its fake kernel, autograd and
the public function.

torch's CPU float32 linear is MKL's sgemm: at the hardware's peak on Intel, on its AVX2 path on AMD, where
oneDNN's JIT-compiled AVX-512 kernels (which the C++ op ``fusedformer::linear_fwd`` drives, see
csrc/cpu/linear.cpp) run twice as fast. Which one serves a model's layer is decided by measurement in
``fusedformer.nn.Linear`` (per shape class, once per process); ``ff.linear`` itself always runs the fused op
where it can.

The backward runs its two products on the same engine (``fusedformer::linear_bwd_input``: grad weight,
``fusedformer::linear_bwd_weight``: grad^T input, each summed in chunks as the forward is) and torch's sum for
the bias. A backward that builds a graph (``create_graph=True``: double backward, gradient penalties) takes
torch's differentiable products instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedformer import backends

__all__ = ["linear", "linear_fwd", "linear_bwd_input", "linear_bwd_weight", "linear_available", "why_not_fused"]


def linear_fwd(
    input: torch.Tensor,  # (*, K) float32, CPU
    weight: torch.Tensor,  # (N, K) float32, CPU
    bias: torch.Tensor | None,  # (N,) float32 or None
) -> torch.Tensor:  # (*, N)
    return torch.ops.fusedformer.linear_fwd.default(input, weight, bias)


def linear_bwd_input(
    grad: torch.Tensor,  # (*, N) float32, CPU
    weight: torch.Tensor,  # (N, K) float32, CPU
) -> torch.Tensor:  # (*, K) = grad @ weight
    return torch.ops.fusedformer.linear_bwd_input.default(grad, weight)


def linear_bwd_weight(
    grad: torch.Tensor,  # (*, N) float32, CPU
    input: torch.Tensor,  # (*, K) float32, CPU, the same leading shape
) -> torch.Tensor:  # (N, K) = grad^T @ input, summed over the leading indices
    return torch.ops.fusedformer.linear_bwd_weight.default(grad, input)


def _fake(input, weight, bias):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _fake_bwd_input(grad, weight):
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


def _fake_bwd_weight(grad, input):
    return grad.new_empty((grad.shape[-1], input.shape[-1]))


def _setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    N, K = weight.shape
    g2 = grad.reshape(-1, N)
    if torch.is_grad_enabled():  # create_graph=True: differentiable products (double backward)
        grad_input = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_weight = g2.t().mm(input.reshape(-1, K)) if ctx.needs_input_grad[1] else None
    else:
        grad_input = linear_bwd_input(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = linear_bwd_weight(grad, input) if ctx.needs_input_grad[1] else None
    grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_input, grad_weight, grad_bias


def _registered() -> bool:
    return backends._C is not None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedformer::{op}", "CPU")
        for op in ("linear_fwd", "linear_bwd_input", "linear_bwd_weight")
    )


_AVAILABLE = _registered()
if _AVAILABLE:
    torch.library.register_fake("fusedformer::linear_fwd", _fake)
    torch.library.register_fake("fusedformer::linear_bwd_input", _fake_bwd_input)
    torch.library.register_fake("fusedformer::linear_bwd_weight", _fake_bwd_weight)
    torch.library.register_autograd("fusedformer::linear_fwd", _backward, setup_context=_setup_context)


def why_not_fused(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why the fused op cannot serve this call (torch's F.linear then does), or None when it can."""
    forced = backends._forced_backend()
    if forced == "reference":
        return "FUSEDFORMER_BACKEND=reference: the plain F.linear"
    if forced == "triton":
        return "FUSEDFORMER_BACKEND=triton: fusedformer has no Triton linear (on a GPU torch's linear is cuBLAS)"
    if not _AVAILABLE:
        return backends._C_ERROR or "fusedformer._C has no linear_fwd kernel"
    tensors = [t for t in (input, weight, bias) if t is not None]
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return "a tensor subclass (a DTensor, say): torch's F.linear knows how to run it"
    if any(t.device.type != "cpu" for t in tensors):
        return "not on the CPU (on a GPU torch's cuBLAS linear is the engine to use)"
    if input.dtype not in (torch.float32, torch.float16) or any(t.dtype != input.dtype for t in tensors):
        return (f"{input.dtype} input with a {weight.dtype} weight (float32, or float16 computed in float32; "
                "torch's bfloat16 linear already runs on oneDNN)")
    return None


def linear_available() -> bool:
    """Whether fusedformer._C carries the float32 CPU linear."""
    return _AVAILABLE


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(input, weight, bias)``: ``input @ weight^T + bias`` on oneDNN's brgemm for float32 CPU tensors
    (float16 ones are computed in float32 and rounded once: torch's float16 CPU GEMM is slow without
    AVX512-FP16).

    Shapes: input ``(*, K)``, weight ``(N, K)``, bias ``(N,)`` -> ``(*, N)`` in input's dtype. Under
    ``torch.autocast`` the floating inputs are cast to autocast's dtype first, as for ``F.linear`` (bfloat16
    then runs on torch's own bfloat16 linear, float16 on this op in float32).

    The reduction over K runs in chunks whose sums are added in order, so its float32 error is at most
    torch's (measured 0.65-0.9x of ``F.linear``'s against float64 at K = 384..2048). Other devices and dtypes
    go to ``F.linear`` itself (``why_not_fused`` says why). The backward's two products run on the same engine,
    chunked the same way (torch's differentiable products when the backward builds a graph).
    """
    dtype = backends.autocast_dtype(input)
    if dtype is not None:  # under torch.autocast: the inputs cast as autocast casts them for F.linear
        cast = [backends.autocast_cast(t, dtype) for t in (input, weight, bias)]
        with torch.autocast(input.device.type, enabled=False):
            return linear(*cast)
    if why_not_fused(input, weight, bias) is not None or input.dim() == 0:
        return F.linear(input, weight, bias)
    if input.dtype == torch.float16:
        # in float32, rounded once at the end: torch's own float16 CPU GEMM has no fast path without
        # AVX512-FP16 (about 1 GFLOP/s on an AMD EPYC); the conversions are differentiable torch ops
        out = linear_fwd(input.float(), weight.float(), None if bias is None else bias.float())
        return out.to(torch.float16)
    return linear_fwd(input, weight, bias)
