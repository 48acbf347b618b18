"""Scaled dot-product attention: the public function, the typed op wrappers, fake kernels, autograd.

The ops (``fusedformer::attention_fwd`` / ``attention_bwd``, schemas in csrc/fusedformer.cpp) take
4-D tensors; the public function checks its inputs, flattens the leading dims and picks a backend.
"""

from __future__ import annotations

import math
import sys

import torch

from fusedformer import backends, reference
from fusedformer.ops import sharding

__all__ = [
    "scaled_dot_product_attention",
    "attention_fwd",
    "attention_bwd",
    "attention_dropout_mask",
    "MAX_HEAD_DIM",
]

MAX_HEAD_DIM = 256
_FN = "fusedformer.scaled_dot_product_attention"


# ---- typed wrappers of the ops ------------------------------------------------------------------


def attention_fwd(
    query: torch.Tensor,  # (B, Hq, L, E)
    key: torch.Tensor,  # (B, Hk, S, E)
    value: torch.Tensor,  # (B, Hk, S, Ev)
    attn_mask: torch.Tensor | None,  # broadcastable to (B, Hq, L, S); bool (True = take part) or additive
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,  # dropout on the probabilities, the mask drawn from seed (attention_dropout_mask)
    seed: torch.Tensor | None = None,  # () or (1,) int64 on the CPU; needed when dropout_p > 0
    inference: bool = False,  # no backward follows: the forward's own engine, decode's lane-wise sums
) -> tuple[torch.Tensor, torch.Tensor]:  # out (B, Hq, L, Ev), logsumexp (B, Hq, L) float32
    return torch.ops.fusedformer.attention_fwd.default(
        query, key, value, attn_mask, is_causal, scale, dropout_p, seed, inference
    )


def attention_bwd(
    grad_out: torch.Tensor,  # (B, Hq, L, Ev)
    query: torch.Tensor,  # (B, Hq, L, E)
    key: torch.Tensor,  # (B, Hk, S, E)
    value: torch.Tensor,  # (B, Hk, S, Ev)
    out: torch.Tensor,  # (B, Hq, L, Ev)
    logsumexp: torch.Tensor,  # (B, Hq, L) float32
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,  # as given to attention_fwd
    seed: torch.Tensor | None = None,  # as given to attention_fwd
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # grads shaped as query, key, value
    return torch.ops.fusedformer.attention_bwd.default(
        grad_out, query, key, value, out, logsumexp, attn_mask, is_causal, scale, dropout_p, seed
    )


def attention_dropout_mask(
    B: int, H: int, L: int, S: int, dropout_p: float, seed: int
) -> torch.Tensor:  # (B, H, L, S) bool, True = kept
    """The dropout mask ``attention_fwd(..., dropout_p, seed)`` applies to query ``(B, H, L, E)`` and S keys.

    ``seed`` is the seed tensor's value (an int). Dense, for tests: the kernels (C++ and Triton) draw it
    tile by tile from the same hash and never build it.
    """
    return torch.ops.fusedformer.attention_dropout_mask.default(B, H, L, S, dropout_p, seed)


# Both backends' op pairs share these schemas (csrc/fusedformer.cpp spells out the cpp pair's): seed is a
# tensor so that the public function can draw it inside a torch.compile'd graph.
# inference=True: no backward will be taken through the call, so the CPU kernels may take the engine
# measured fastest for a forward alone and, in the decode kernel, sum float32 scores lane-wise, not in the
# order the backward repeats (the Triton kernels ignore it).
_FWD_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, float scale, "
    "float dropout_p=0.0, Tensor? seed=None, bool inference=False) -> (Tensor out, Tensor logsumexp)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, "
    "Tensor? attn_mask, bool is_causal, float scale, float dropout_p=0.0, Tensor? seed=None) "
    "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"
)
# The op pair that serves each backend (csrc/fusedformer.cpp defines the cpp pair; the triton pair is
# defined below from fusedformer/kernels/attention.py's launchers).
_OPS = {"cpp": ("attention_fwd", "attention_bwd"), "triton": ("triton_attention_fwd", "triton_attention_bwd")}


def _register_autograd(backend: str) -> None:
    fwd_name, bwd_name = _OPS[backend]

    def _setup_context(ctx, inputs, output):
        query, key, value, attn_mask, is_causal, scale, dropout_p, seed, inference = inputs  # defaults filled in
        out, lse = output
        ctx.mark_non_differentiable(lse)  # saved for the backward; the public function never returns it
        ctx.save_for_backward(query, key, value, out, lse, attn_mask, seed)
        ctx.is_causal = is_causal
        ctx.scale = scale
        ctx.dropout_p = dropout_p
        ctx.inference = inference

    def _backward(ctx, grad_out, grad_lse):
        if ctx.inference:
            raise RuntimeError(
                f"fusedformer::{fwd_name} was called with inference=True, which promises that no backward "
                "follows (its scores may be summed in another order than the backward's): call it with "
                "inference=False to differentiate through it"
            )
        query, key, value, out, lse, attn_mask, seed = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        bwd = getattr(torch.ops.fusedformer, bwd_name).default
        dq, dk, dv = bwd(
            grad_out, query, key, value, out, lse, attn_mask, ctx.is_causal, ctx.scale, ctx.dropout_p, seed
        )
        return dq, dk, dv, None, None, None, None, None, None

    torch.library.register_autograd(f"fusedformer::{fwd_name}", _backward, setup_context=_setup_context)
    backends.forbid_double_backward(f"fusedformer::{bwd_name}")


def _attention_fwd_fake(query, key, value, attn_mask, is_causal, scale, dropout_p=0.0, seed=None, inference=False):
    B, Hq, L, _ = query.shape
    Ev = value.shape[-1]
    out = query.new_empty((B, Hq, L, Ev))
    lse = query.new_empty((B, Hq, L), dtype=torch.float32)
    return out, lse


def _attention_fwd_fake_cpp(query, key, value, attn_mask, is_causal, scale, dropout_p=0.0, seed=None,
                            inference=False):
    """The C++ forward's output follows query's layout (csrc/cpu/attention.cpp, empty_attention_out):
    ``(B, L, Hq, Ev)`` in memory, seen as ``(B, Hq, L, Ev)``, when query's heads are inside its rows (a
    linear layer's output viewed as heads, as models make it; torch's CPU attention returns that layout
    too), so that the caller's ``transpose(1, 2).contiguous()`` copies nothing; contiguous otherwise."""
    out, lse = _attention_fwd_fake(query, key, value, attn_mask, is_causal, scale, dropout_p, seed)
    B, Hq, L, _ = query.shape
    if Hq > 1 and L > 1 and query.stride(1) < query.stride(2):
        out = query.new_empty((B, L, Hq, value.shape[-1])).transpose(1, 2)
    return out, lse


def _attention_bwd_fake(grad_out, query, key, value, out, logsumexp, attn_mask, is_causal, scale,
                        dropout_p=0.0, seed=None):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _register_cpp() -> None:
    torch.library.register_fake("fusedformer::attention_fwd", _attention_fwd_fake_cpp)
    torch.library.register_fake("fusedformer::attention_bwd", _attention_bwd_fake)

    @torch.library.register_fake("fusedformer::attention_dropout_mask")
    def _attention_dropout_mask_fake(B, H, L, S, dropout_p, seed):
        return torch.empty((B, H, L, S), dtype=torch.bool)

    _register_autograd("cpp")


def _register_triton(kernels) -> None:
    # the launchers serve CUDA tensors, and CPU tensors under the interpreter (see register_triton_op)
    backends.register_triton_op(
        "fusedformer::triton_attention_fwd", kernels.attention_forward, _FWD_SCHEMA, _attention_fwd_fake
    )
    backends.register_triton_op(
        "fusedformer::triton_attention_bwd", kernels.attention_backward, _BWD_SCHEMA, _attention_bwd_fake
    )
    _register_autograd("triton")


if backends._C is not None:
    _register_cpp()
if backends.TRITON_KERNELS:
    _register_triton(backends.TRITON_KERNELS["attention"])


# ---- DTensor sharding rules (tensor parallelism; see ops/sharding.py) ----------------------------


def _mask_placement(attn_mask, dim: int):
    """attn_mask's placement when query shards on ``dim`` (0 batch, 1 heads): sharded along if it has
    that dim, replicated where it broadcasts (size 1, or fewer than 4 dims)."""
    from torch.distributed.tensor import Replicate, Shard

    if attn_mask is None:
        return None
    pos = dim - (4 - attn_mask.ndim)
    return Shard(pos) if pos >= 0 and attn_mask.shape[pos] != 1 else Replicate()


def _head_shards(query, key, value) -> int:
    """How many pieces query/key/value arrive cut into along the heads (dim 1), over all mesh dims."""
    from torch.distributed.tensor import Shard

    mesh, n = query.mesh, 1
    for m in range(mesh.ndim):
        if any(t.placements[m] == Shard(1) for t in (query, key, value)):
            n *= mesh.size(m)
    return n


def _attention_dims(query, key, value) -> list[int]:
    """The dims attention shards on: batch (0) always; heads (1) unless GQA groups would split.

    With GQA (Hq = g * Hk), query head h reads key head h // g: a shard of Hq / n query heads finds its
    key heads in the shard of Hk / n key heads only when n divides Hk. Raises if the inputs arrive
    sharded on heads otherwise.
    """
    Hq, Hk = query.shape[1], key.shape[1]
    if Hq == Hk:
        return [0, 1]  # any split, even an uneven one, cuts query and key heads alike
    n = _head_shards(query, key, value)
    if n > 1 and Hk % n != 0:
        raise sharding.ShardingError(
            f"fusedformer attention: query ({Hq} heads) and key/value ({Hk} heads) arrive sharded on heads into "
            f"{n} pieces; with grouped-query attention both must split evenly into the same groups, so the "
            f"number of pieces must divide key's heads ({Hk}). Shard on batch (Shard(0)), or use a mesh whose "
            f"size divides {Hk}"
        )
    if n > 1:
        return [0, 1]
    return [0, 1] if Hk % query.mesh.size() == 0 else [0]  # not head-sharded yet: offer heads where safe


@sharding.rules("attention_fwd", "triton_attention_fwd")
def _attention_fwd_rules(query, key, value, attn_mask, is_causal, scale, dropout_p=0.0, seed=None,
                         inference=False):
    from torch.distributed.tensor import Replicate, Shard

    seed_p = Replicate() if seed is not None else None  # see _shard_dropout_seed
    layouts = [sharding.replicated(2, 9, (query, key, value, attn_mask, None, None, None, seed, None))]
    for d in _attention_dims(query, key, value):
        S = Shard(d)
        layouts.append(([S, S], [S, S, S, _mask_placement(attn_mask, d), None, None, None, seed_p, None]))
    return layouts


@sharding.rules("attention_bwd", "triton_attention_bwd")
def _attention_bwd_rules(grad_out, query, key, value, out, logsumexp, attn_mask, is_causal, scale,
                         dropout_p=0.0, seed=None):
    from torch.distributed.tensor import Replicate, Shard

    seed_p = Replicate() if seed is not None else None  # see _shard_dropout_seed
    args = (grad_out, query, key, value, out, logsumexp, attn_mask) + (None,) * 3 + (seed,)
    layouts = [sharding.replicated(3, 11, args)]
    for d in _attention_dims(query, key, value):
        S = Shard(d)
        layouts.append(([S, S, S], [S, S, S, S, S, S, _mask_placement(attn_mask, d), None, None, None, seed_p]))
    if dropout_p > 0.0:
        # the backward redraws the forward's dropout mask from the same seed and the same local
        # (b, h, i, j): it must run on the forward's shards, those of out
        layouts = [lay for lay in layouts if lay[1][4] in out.placements]
    return layouts


# ---- the public function ------------------------------------------------------------------------


def _broadcasts_to(shape, target) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target``: torch.broadcast_shapes's rule, in ~0.5 us where
    that function takes ~20 (a third of a small attention call's time)."""
    if len(shape) > len(target):
        return False
    return all(n == 1 or n == t for n, t in zip(reversed(shape), reversed(target)))


def _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    """Raises, naming the argument, on anything the attention contract does not allow."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_FN}: expected {name} to be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{_FN}: expected {name} to be a floating-point tensor, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{_FN}: expected {name} to have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")
    if not (key.dtype == value.dtype == query.dtype):
        raise TypeError(
            f"{_FN}: expected query, key and value of one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (key.device == value.device == query.device):
        raise ValueError(
            f"{_FN}: expected query, key and value on one device, got {query.device}, {key.device}, {value.device}"
        )
    if not (key.dim() == value.dim() == query.dim()):
        raise ValueError(
            f"{_FN}: expected query, key and value of one rank, got shapes {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    E, S = query.shape[-1], key.shape[-2]
    if key.shape[-1] != E:
        raise ValueError(f"{_FN}: expected key's last dim to equal query's ({E}), got key of shape {tuple(key.shape)}")
    if value.shape[-2] != S:
        raise ValueError(
            f"{_FN}: expected value's dim -2 to equal key's length ({S}), got value of shape {tuple(value.shape)}"
        )
    for name, dim in (("query/key head dim E", E), ("value head dim Ev", value.shape[-1])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{_FN}: {name} must be between 1 and {MAX_HEAD_DIM}, got {dim}")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(
            f"{_FN}: expected query, key and value to share their batch dims, got shapes {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.dim() >= 3:
        Hq, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if Hk != Hv:
            raise ValueError(f"{_FN}: expected key and value with one number of heads, got {Hk} and {Hv}")
        if Hq != Hk:
            if not enable_gqa:
                raise ValueError(
                    f"{_FN}: query has {Hq} heads and key {Hk}; pass enable_gqa=True for grouped-query attention"
                )
            if Hq % Hk != 0:
                raise ValueError(f"{_FN}: with enable_gqa, query's heads ({Hq}) must be a multiple of key's ({Hk})")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"{_FN}: expected attn_mask to be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(
                f"{_FN}: expected attn_mask to be bool or of query's dtype {query.dtype}, got {attn_mask.dtype}"
            )
        if attn_mask.device != query.device:
            raise ValueError(f"{_FN}: expected attn_mask on {query.device} like query, got {attn_mask.device}")
        target = (*query.shape[:-1], S)
        if not _broadcasts_to(attn_mask.shape, target):
            raise ValueError(
                f"{_FN}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (..., L, S) = {target}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_FN}: expected dropout_p in [0, 1), got {dropout_p}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{_FN}: expected scale to be a finite number or None, got {scale!r}")


def _request(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    mask_grad = attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()
    return backends.Request("attention", query.device, query.dtype, float(dropout_p), mask_grad)


def _to_4d(t: torch.Tensor) -> torch.Tensor:
    """(..., H, L, E) -> (B, H, L, E), a view where the strides allow."""
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:])  # not -1: ambiguous for 0 elements


def _mask_to_4d(attn_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """A mask broadcastable to (..., Hq, L, S) -> one broadcastable to (B, Hq, L, S).

    Size-1 dims are kept (the kernel reads them with stride 0); only the batch dims are merged, which
    copies the mask when several batch dims (a rank > 4 query) cannot be merged as a view.
    """
    m = attn_mask
    while m.dim() < query.dim():
        m = m.unsqueeze(0)
    if query.dim() <= 4:
        while m.dim() < 4:
            m = m.unsqueeze(0)
        return m
    batch = query.shape[:-3]
    if all(s == 1 for s in m.shape[:-3]):
        return m.reshape(1, *m.shape[-3:])
    return m.expand(*batch, *m.shape[-3:]).reshape(math.prod(batch), *m.shape[-3:])


def _dropout_seed() -> torch.Tensor:  # () int64 on the CPU
    """A fresh dropout seed from torch's default CPU generator (so torch.manual_seed reproduces it).

    A tensor, never read on the host here: under torch.compile the draw is a node of the graph (no graph
    break, fullgraph=True works; Inductor draws it with its own generator, seeded from torch's, unless
    ``torch._inductor.config.fallback_random``). Eager draws the very value the earlier ``.item()`` drew,
    so a torch.manual_seed gives the same masks as before. The CPU generator on every device: a CPU run
    and a GPU run under one manual_seed draw the same seed, and so drop the same elements.
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")


def _dropout_seed_value() -> int:
    """``_dropout_seed()`` read on the host, for the ops whose schema keeps ``int seed`` (varlen attention,
    add + norm). The same draw from the same generator, so ``torch.manual_seed`` reproduces it.

    NOTE: ``.item()`` is a graph break under torch.compile (unless ``capture_scalar_outputs``), so
    ``fullgraph=True`` fails with those ops' dropout on; only dropout_p > 0 calls take this path.
    """
    return int(_dropout_seed().item())


def _is_dtensor(t) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")  # loaded by anyone who made a DTensor
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _shard_dropout_seed(seed: torch.Tensor, query, key, value):
    """The dropout seed of this rank's shard of 4-D DTensors: ``seed`` (the () int64 tensor of
    ``_dropout_seed``) mixed with the rank's coordinates on the mesh dims where query is sharded on batch
    or heads, so that shards draw independent masks while replicas (equal coordinates there) draw the same
    one. The kernel's mask is a function of (seed, local b, h, i, j); with one seed everywhere every shard
    would repeat the same pattern.

    Returns a () int64 DTensor, ``Replicate()`` on every mesh dim (the ops' sharding rules take the seed
    replicated; its local value differs between shards on purpose, hence ``run_check=False``). Reads the
    seed on the host (``.item()``): a graph break under torch.compile, on the DTensor path only.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    for name, t in (("key", key), ("value", value)):
        if not _is_dtensor(t) or t.placements != query.placements:
            raise sharding.ShardingError(
                f"{_FN}: attention dropout on DTensors needs key and value laid out as query "
                f"({query.placements}), got {name} {getattr(t, 'placements', type(t).__name__)}; redistribute them "
                f"first (the shards' dropout seeds follow query's layout)"
            )
    for p in query.placements:
        if p not in (Replicate(), Shard(0), Shard(1)):
            raise sharding.ShardingError(
                f"{_FN}: attention dropout on DTensors needs query sharded on batch or heads (or replicated) "
                f"on every mesh dim, got {query.placements}"
            )
    mesh, index = query.device_mesh, 0
    coordinate = mesh.get_coordinate()
    for m, p in enumerate(query.placements):
        if p != Replicate():
            index = index * mesh.size(m) + coordinate[m]
    mixed = (int(seed.item()) ^ (index * 0x9E3779B97F4A7C15)) % 2**62  # index 0 keeps the seed
    return DTensor.from_local(torch.tensor(mixed, dtype=torch.int64), mesh, [Replicate()] * mesh.ndim, run_check=False)


def scaled_dot_product_attention(
    query: torch.Tensor,  # (..., Hq, L, E)
    key: torch.Tensor,  # (..., Hk, S, E)
    value: torch.Tensor,  # (..., Hk, S, Ev)
    attn_mask: torch.Tensor | None = None,  # broadcastable to (..., Hq, L, S)
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:  # (..., Hq, L, Ev)
    """Fused attention with the signature and semantics of ``F.scaled_dot_product_attention``.

    Args:
        query: ``(..., Hq, L, E)``; 2-D ``(L, E)`` and 3-D ``(H, L, E)`` inputs work too.
        key: ``(..., Hk, S, E)``; ``Hk == Hq``, or ``Hq`` a multiple of ``Hk`` with ``enable_gqa``.
        value: ``(..., Hk, S, Ev)``; ``Ev`` may differ from ``E``; head dims 1 to 256.
        attn_mask: broadcastable to ``(..., Hq, L, S)``: bool (True = the key takes part) or a float
            mask in query's dtype, added to the scores. Read tile by tile, never expanded.
        dropout_p: attention dropout on the probabilities (after the softmax, before ``@ value``), kept
            ones scaled by ``1 / (1 - dropout_p)``, as torch. Fused on both backends: the mask is a
            counter-based hash of (seed, b, h, i, j), the seed drawn from torch's default CPU generator (so
            ``torch.manual_seed`` makes runs reproducible; the draw differs from torch's own dropout),
            and the backward draws the same mask again; nothing of size (L, S) is stored. The C++ and
            Triton kernels draw the same mask for a seed (a CPU run and a GPU run drop the same
            elements). The seed is drawn as a tensor, so ``torch.compile(fullgraph=True)`` works.
        is_causal: query ``i`` sees keys ``j <= i``, aligned top-left as in torch; for L=3, S=5::

                1 0 0 0 0
                1 1 0 0 0
                1 1 1 0 0

            Unlike torch, it may be combined with ``attn_mask`` (both apply).
        scale: the scores' factor; ``1/sqrt(E)`` when None.
        enable_gqa: allow grouped-query attention (query head ``h`` uses key head ``h // (Hq // Hk)``).

    Tensor parallel (DTensor inputs; ops ``attention_fwd`` / ``attention_bwd`` and their Triton twins): the
    4-D ``(B, H, L, E)`` view runs sharded on batch (``Shard(0)``) or heads (``Shard(1)``), query, key,
    value, out, logsumexp and the gradients alike; the mask shards along where it has that dim and is
    replicated where it broadcasts. With GQA the heads shard only when the number of pieces divides Hk
    (query and key/value head groups stay together), else a ``ShardingError``. Any other layout is
    gathered (``Replicate()``) with a one-time ``ShardingWarning``. Dropout on shards: each shard's seed is
    the drawn seed mixed with its coordinates on the mesh dims where query is sharded (replicas share
    it), so shards draw independent masks (not the unsharded call's mask); the backward runs on the
    forward's shards and redraws the same ones; key and value must then arrive laid out as query.

    Under ``torch.autocast`` the floating inputs are cast to autocast's dtype first, as autocast does for
    torch's SDPA (float32 in, bfloat16 out under a CPU bfloat16 autocast).

    Returns ``(..., Hq, L, Ev)`` in query's dtype. A query row whose keys are all masked out gives 0
    (and gradient 0), never NaN. No ``(L, S)`` score matrix is ever built: the kernels stream key tiles
    with an online softmax and save only the log-sum-exp for the backward.
    """
    dtype = backends.autocast_dtype(query)
    if dtype is not None:  # under torch.autocast: the inputs cast as autocast casts them for torch's SDPA
        cast = [backends.autocast_cast(t, dtype) for t in (query, key, value, attn_mask)]
        with torch.autocast(query.device.type, enabled=False):
            return scaled_dot_product_attention(*cast, dropout_p, is_causal, scale, enable_gqa)
    request = _request(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    backend = backends.select(request)
    if backend == "reference":
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
    scale_value = float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    mask4 = _mask_to_4d(attn_mask, query) if attn_mask is not None else None
    fwd = backends.fused_op(_OPS[backend][0])
    q4, k4, v4 = _to_4d(query), _to_4d(key), _to_4d(value)
    seed = _dropout_seed() if dropout_p > 0.0 else None
    if seed is not None and _is_dtensor(q4):
        seed = _shard_dropout_seed(seed, q4, k4, v4)
    # no input needs a gradient: no backward follows, and the CPU kernels may take their fastest forward
    inference = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q4, k4, v4)))
    out, _ = backends.call(fwd, q4, k4, v4, mask4, bool(is_causal), scale_value, float(dropout_p), seed, inference)
    return out if query.dim() == 4 else out.reshape(*query.shape[:-1], value.shape[-1])
