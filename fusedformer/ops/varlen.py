"""Attention over packed variable-length sequences: the public function, typed op wrappers, fake
kernels, autograd.

The ops (``fusedformer::varlen_attention_fwd`` / ``varlen_attention_bwd``, schemas in
csrc/fusedformer.cpp; bodies in csrc/cpu/varlen.cpp, and in fusedformer/kernels/attention.py for Triton) run the
attention kernels on each sequence in place, through per-sequence offsets into the packed tensors:
no padding, no copy of the inputs.
"""

from __future__ import annotations

import math

import torch

from fusedformer import backends, reference
from fusedformer.ops import sharding
from fusedformer.ops.attention import MAX_HEAD_DIM, _dropout_seed_value

__all__ = ["varlen_attention", "varlen_attention_fwd", "varlen_attention_bwd"]

_FN = "fusedformer.varlen_attention"


# ---- typed wrappers of the ops ------------------------------------------------------------------


def varlen_attention_fwd(
    query: torch.Tensor,  # (total_q, Hq, E)
    key: torch.Tensor,  # (total_k, Hk, E)
    value: torch.Tensor,  # (total_k, Hk, Ev)
    cu_seqlens_q: torch.Tensor,  # (B + 1,) int32
    cu_seqlens_k: torch.Tensor,  # (B + 1,) int32
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # out (total_q, Hq, Ev), logsumexp (Hq, total_q) float32
    return torch.ops.fusedformer.varlen_attention_fwd.default(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, dropout_p, seed
    )


def varlen_attention_bwd(
    grad_out: torch.Tensor,  # (total_q, Hq, Ev)
    query: torch.Tensor,  # (total_q, Hq, E)
    key: torch.Tensor,  # (total_k, Hk, E)
    value: torch.Tensor,  # (total_k, Hk, Ev)
    out: torch.Tensor,  # (total_q, Hq, Ev)
    logsumexp: torch.Tensor,  # (Hq, total_q) float32
    cu_seqlens_q: torch.Tensor,  # (B + 1,) int32
    cu_seqlens_k: torch.Tensor,  # (B + 1,) int32
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,  # as given to varlen_attention_fwd
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # grads shaped as query, key, value
    return torch.ops.fusedformer.varlen_attention_bwd.default(
        grad_out, query, key, value, out, logsumexp, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        is_causal, scale, dropout_p, seed,
    )  # fmt: skip


_FWD_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, bool is_causal, float scale) -> (Tensor out, Tensor logsumexp)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, "
    "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool is_causal, float scale) "
    "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"
)
_OPS = {
    "cpp": ("varlen_attention_fwd", "varlen_attention_bwd"),
    "triton": ("triton_varlen_attention_fwd", "triton_varlen_attention_bwd"),
}
# only the cpp pair has dropout (the Triton backend declines varlen dropout_p > 0, see backends.py)
_EXTRA_ARGS = {"cpp": ("dropout_p", "seed"), "triton": ()}
_N_ARGS = 9  # query .. scale


def _register_autograd(backend: str) -> None:
    fwd_name, bwd_name = _OPS[backend]
    n_extra = len(_EXTRA_ARGS[backend])

    def _setup_context(ctx, inputs, output):
        query, key, value, cu_q, cu_k, max_q, max_k, is_causal, scale = inputs[:_N_ARGS]
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(query, key, value, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, is_causal, scale) + tuple(inputs[_N_ARGS:_N_ARGS + n_extra])

    def _backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse, cu_q, cu_k = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        bwd = getattr(torch.ops.fusedformer, bwd_name).default
        dq, dk, dv = bwd(grad_out, query, key, value, out, lse, cu_q, cu_k, *ctx.args)
        return (dq, dk, dv) + (None,) * (_N_ARGS - 3 + n_extra)

    torch.library.register_autograd(f"fusedformer::{fwd_name}", _backward, setup_context=_setup_context)
    backends.forbid_double_backward(f"fusedformer::{bwd_name}")


def _varlen_fwd_fake(query, key, value, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p=0.0, seed=0):
    total_q, Hq, _ = query.shape
    out = query.new_empty((total_q, Hq, value.shape[-1]))
    lse = query.new_empty((Hq, total_q), dtype=torch.float32)
    return out, lse


def _varlen_bwd_fake(grad_out, query, key, value, out, lse, cu_q, cu_k, max_q, max_k, is_causal, scale,
                     dropout_p=0.0, seed=0):  # fmt: skip
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _register_cpp() -> None:
    torch.library.register_fake("fusedformer::varlen_attention_fwd", _varlen_fwd_fake)
    torch.library.register_fake("fusedformer::varlen_attention_bwd", _varlen_bwd_fake)
    _register_autograd("cpp")


def _register_triton(kernels) -> None:
    # see backends.register_triton_op: a triton_op on a GPU, an opaque op with this fake when interpreted
    backends.register_triton_op(
        "fusedformer::triton_varlen_attention_fwd", kernels.varlen_attention_forward, _FWD_SCHEMA, _varlen_fwd_fake
    )
    backends.register_triton_op(
        "fusedformer::triton_varlen_attention_bwd", kernels.varlen_attention_backward, _BWD_SCHEMA, _varlen_bwd_fake
    )
    _register_autograd("triton")


if backends._CPU_KERNELS.get("varlen_attention", False):
    _register_cpp()
if backends.TRITON_KERNELS:
    _register_triton(backends.TRITON_KERNELS["attention"])


# ---- the public function ------------------------------------------------------------------------


def _check_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale):
    """Raises, naming the argument, on what the contract does not allow: shapes, dtypes and devices here
    (metadata only, no synchronisation); the lengths' values are checked by the ops themselves."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_FN}: expected {name} to be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{_FN}: expected {name} to be a floating-point tensor, got {t.dtype}")
    layouts = (("query", query, "(total_q, Hq, E)"), ("key", key, "(total_k, Hk, E)"),
               ("value", value, "(total_k, Hk, Ev)"))  # fmt: skip
    for name, t, layout in layouts:
        if t.dim() != 3:
            raise ValueError(f"{_FN}: expected {name} to be 3-D {layout}, got shape {tuple(t.shape)}")
    if not (key.dtype == value.dtype == query.dtype):
        raise TypeError(
            f"{_FN}: expected query, key and value of one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (key.device == value.device == query.device):
        raise ValueError(
            f"{_FN}: expected query, key and value on one device, got {query.device}, {key.device}, {value.device}"
        )
    if value.shape[:2] != key.shape[:2]:
        raise ValueError(
            f"{_FN}: expected value (total_k, Hk, Ev) with key's first two dims {tuple(key.shape[:2])}, "
            f"got value of shape {tuple(value.shape)}"
        )
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"{_FN}: expected key's head dim to equal query's ({query.shape[2]}), got {key.shape[2]}")
    Hq, Hk = query.shape[1], key.shape[1]
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"{_FN}: expected query's heads ({Hq}) to be a positive multiple of key's ({Hk})")
    for name, dim in (("query/key head dim E", query.shape[2]), ("value head dim Ev", value.shape[2])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{_FN}: {name} must be between 1 and {MAX_HEAD_DIM}, got {dim}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{_FN}: expected {name} to be a Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{_FN}: expected {name} of dtype torch.int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{_FN}: expected {name} to be 1-D (B + 1,), got shape {tuple(cu.shape)}")
        if cu.device != query.device:
            raise ValueError(f"{_FN}: expected {name} on {query.device} like query, got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"{_FN}: expected cu_seqlens_q and cu_seqlens_k of one length B + 1, got {cu_seqlens_q.numel()} "
            f"and {cu_seqlens_k.numel()}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{_FN}: expected {name} to be an int >= 0, got {m!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_FN}: expected dropout_p in [0, 1), got {dropout_p}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{_FN}: expected scale to be a finite number or None, got {scale!r}")


def check_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int, name: str, max_name: str) -> None:
    """The values check of cu_seqlens the ops make (for the reference path): from 0, non-decreasing, ending
    at ``total``, no length above ``max_seqlen``. Reads the tensor (a synchronisation on a GPU)."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{_FN}: expected {name}[0] == 0, got {cu[0]}")
    for b in range(1, len(cu)):
        if cu[b] < cu[b - 1]:
            raise ValueError(f"{_FN}: expected {name} non-decreasing, got {name}[{b}] = {cu[b]} < {cu[b - 1]}")
        if cu[b] - cu[b - 1] > max_seqlen:
            raise ValueError(f"{_FN}: sequence {b - 1} has length {cu[b] - cu[b - 1]} > {max_name} = {max_seqlen}")
    if cu[-1] != total:
        raise ValueError(f"{_FN}: expected {name}[-1] to equal the packed length {total}, got {cu[-1]}")


def _request(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p=0.0,
             is_causal=False, scale=None):  # fmt: skip
    _check_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale)
    return backends.Request("varlen_attention", query.device, query.dtype, float(dropout_p))


def varlen_attention(
    q: torch.Tensor,  # (total_q, Hq, E)
    k: torch.Tensor,  # (total_k, Hk, E)
    v: torch.Tensor,  # (total_k, Hk, Ev)
    cu_seqlens_q: torch.Tensor,  # (B + 1,) int32
    cu_seqlens_k: torch.Tensor,  # (B + 1,) int32
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:  # (total_q, Hq, Ev)
    """Attention over packed sequences of different lengths, without padding (FlashAttention's
    ``flash_attn_varlen_func``).

    Args:
        q: ``(total_q, Hq, E)``, the queries of all sequences one after another, tokens first.
        k: ``(total_k, Hk, E)``; ``Hq`` a multiple of ``Hk`` (grouped-query: query head ``h`` reads key
            head ``h // (Hq // Hk)``).
        v: ``(total_k, Hk, Ev)``; head dims 1 to 256.
        cu_seqlens_q: int32 ``(B + 1,)``, cumulative query lengths: ``0 = cu[0] <= cu[1] <= ... <= cu[B] =
            total_q``; sequence ``b`` holds queries ``[cu[b], cu[b + 1])``. A sequence may be empty (it
            gives nothing); a sequence with queries but no keys gives 0 for its rows.
        cu_seqlens_k: int32 ``(B + 1,)``, the same for the keys and values.
        max_seqlen_q, max_seqlen_k: bounds on the lengths (the GPU grid is sized by them); a length
            above its bound is an error.
        dropout_p: attention dropout on the probabilities, kept ones scaled by ``1 / (1 - dropout_p)``;
            the cpp backend fuses it with the mask of ``ff.scaled_dot_product_attention`` on the padded
            batch: element ``(i, j)`` of head ``h`` of sequence ``b`` is kept as element ``(b, h, i, j)``
            of ``attention_dropout_mask(B, Hq, max L, max S, dropout_p, seed)`` (positions counted from
            each sequence's start), so that with one seed the two agree token for token. The seed comes
            from torch's default CPU generator. The Triton backend has no dropout (reference fallback,
            with a warning).
        is_causal: per sequence, aligned top-left as in ``ff.scaled_dot_product_attention`` (query ``i``
            of a sequence sees its keys ``j <= i``; the same as bottom-right when ``L_b == S_b``, i.e.
            self-attention); for ``L_b = 3``, ``S_b = 5``::

                1 0 0 0 0
                1 1 0 0 0
                1 1 1 0 0

        scale: the scores' factor; ``1/sqrt(E)`` when None.

    Returns ``(total_q, Hq, Ev)`` in q's dtype: row ``cu_seqlens_q[b] + i`` is query ``i`` of sequence ``b``
    attending to that sequence's keys only. Differentiable in q, k, v. The kernels never read or compute
    anything outside the sequences (there is no padding) and never build an ``(L, S)`` score matrix. The
    lengths' values are checked by the op (on a GPU, that reads cu_seqlens back once per call).

    Tensor parallel (DTensor inputs; ops ``varlen_attention_fwd`` / ``_bwd``): q, k, v, out and the
    gradients sharded on heads (dim 1; logsumexp on its dim 0), cu_seqlens replicated; with GQA only where
    the pieces divide Hk. The tokens never shard (a boundary would cut a sequence): any other layout is
    gathered with a one-time ``ShardingWarning``.
    """
    request = _request(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
                       is_causal=is_causal, scale=scale)  # fmt: skip
    backend = backends.select(request)
    if backend != "cpp":  # the cpp op checks them itself, without a round trip through Python
        check_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q", "max_seqlen_q")
        check_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k", "max_seqlen_k")
    if backend == "reference":
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, is_causal, scale)
    scale_value = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    fwd = getattr(torch.ops.fusedformer, _OPS[backend][0]).default
    extra = ()
    if backend == "cpp" and dropout_p > 0.0:
        extra = (float(dropout_p), _dropout_seed_value())
    out, _ = fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(is_causal),
                 scale_value, *extra)  # fmt: skip
    return out


# ---- DTensor sharding rules (tensor parallelism; see ops/sharding.py) ----------------------------
# Packed sequences, tokens first: q (total_q, Hq, E), k and v (total_k, Hk, E/Ev), out (total_q, Hq, Ev),
# logsumexp (Hq, total_q). Heads are independent: shard on them (dim 1; logsumexp's dim 0), with
# grouped-query attention only where the shards keep the query and key head groups together (the
# pieces divide Hk). The tokens never shard: a shard boundary would cut a sequence. cu_seqlens are
# replicated. With dropout, each head shard draws the mask of its local heads (one seed: shards
# repeat one pattern; each element is still kept with probability 1 - p).


def _varlen_head_layouts(n_out: int, out_heads, in_heads, query, key):
    from torch.distributed.tensor import Replicate, Shard

    layouts = [([Replicate()] * n_out, [None if p is None else Replicate() for p in in_heads])]
    Hq, Hk = query.shape[1], key.shape[1]
    if Hq == Hk or Hk % query.mesh.size() == 0:
        place = {"H": Shard(1), "L": Shard(0), "R": Replicate(), None: None}
        layouts.append(([place[p] for p in out_heads], [place[p] for p in in_heads]))
    return layouts


@sharding.rules("varlen_attention_fwd", "triton_varlen_attention_fwd")
def _varlen_fwd_rules(query, key, value, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p=0.0, seed=0):
    return _varlen_head_layouts(2, ["H", "L"], ["H", "H", "H", "R", "R"] + [None] * 6, query, key)


@sharding.rules("varlen_attention_bwd", "triton_varlen_attention_bwd")
def _varlen_bwd_rules(grad_out, query, key, value, out, lse, cu_q, cu_k, max_q, max_k, is_causal, scale,
                      dropout_p=0.0, seed=0):
    return _varlen_head_layouts(3, ["H", "H", "H"], ["H", "H", "H", "H", "H", "L", "R", "R"] + [None] * 6, query, key)
