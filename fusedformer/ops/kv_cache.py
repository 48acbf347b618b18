"""Attention against a KV cache, for generation: ``ff.attention_with_kv_cache``.

The op ``fusedformer::attention_with_kv_cache`` (schema in csrc/fusedformer.cpp) appends the new keys and
values to the caches in place and attends; its CPU body (csrc/cpu/kv_cache.cpp) checks everything before
it writes, then runs the decode kernel (the key range split over the threads, partial results merged by
their log-sum-exp) or, for a prefill over equal lengths, the attention forward on the GEMM engine.
"""

from __future__ import annotations

import math

import torch

from fusedformer import backends, reference

__all__ = ["attention_with_kv_cache"]

_FN = "fusedformer.attention_with_kv_cache"
MAX_HEAD_DIM = 256


def _register_cpp() -> None:
    @torch.library.register_fake("fusedformer::attention_with_kv_cache")
    def _fake(query, k_cache, v_cache, key, value, cache_seqlens, is_causal, scale):
        # (mixed devices dispatch here, to the Meta key, when one input is a meta tensor)
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("key", key), ("value", value),
                        ("cache_seqlens", cache_seqlens)):
            if t is not None and t.device != query.device:
                raise ValueError(f"fusedformer::attention_with_kv_cache: expected {name} on {query.device} like "
                                 f"query, got {t.device}")
        B, Hq, L, _ = query.shape
        return query.new_empty((B, Hq, L, v_cache.shape[-1]))


def _register_triton(kernels) -> None:
    # A plain custom op (opaque to torch.compile): its launcher reads the lengths on the host to check them
    # before writing, which a traced triton_op could not do.
    op = torch.library.custom_op(
        "fusedformer::triton_attention_with_kv_cache", kernels.attention_with_kv_cache,
        mutates_args=("k_cache", "v_cache"),
        schema="(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? key, Tensor? value, "
        "Tensor? cache_seqlens, bool is_causal, float scale) -> Tensor",
    )
    op.register_fake(lambda query, k_cache, v_cache, *args: query.new_empty((*query.shape[:3], v_cache.shape[-1])))


_OPS = {"cpp": "attention_with_kv_cache", "triton": "triton_attention_with_kv_cache"}
if backends._C is not None:
    _register_cpp()
if backends.TRITON_KERNELS:
    _register_triton(backends.TRITON_KERNELS["decode"])


def _check(query, k_cache, v_cache, key, value, cache_seqlens) -> None:
    """Raises, naming the argument, on shapes, dtypes and devices the contract does not allow."""
    tensors = [("query", query), ("k_cache", k_cache), ("v_cache", v_cache)]
    if (key is None) != (value is None):
        raise ValueError(f"{_FN}: expected key and value both given or both None")
    if key is not None:
        tensors += [("key", key), ("value", value)]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_FN}: expected {name} to be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{_FN}: expected {name} to be a floating-point tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{_FN}: expected {name} to be 4-D, got shape {tuple(t.shape)}")
        if t.dtype != query.dtype:
            raise TypeError(f"{_FN}: expected {name} of query's dtype {query.dtype}, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{_FN}: expected {name} on {query.device} like query, got {t.device}")
    B, Hq, L, E = query.shape
    Bk, Hk, S_max, Ek = k_cache.shape
    if (Bk, Ek) != (B, E) or v_cache.shape[:3] != (B, Hk, S_max):
        raise ValueError(
            f"{_FN}: expected k_cache (B, Hk, S_max, E) = ({B}, Hk, S_max, {E}) and v_cache (B, Hk, S_max, Ev) "
            f"of the same B, Hk, S_max; got query {tuple(query.shape)}, k_cache {tuple(k_cache.shape)}, "
            f"v_cache {tuple(v_cache.shape)}"
        )
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"{_FN}: expected query's heads ({Hq}) to be a multiple of the caches' ({Hk})")
    Ev = v_cache.shape[-1]
    for name, dim in (("query/key head dim E", E), ("value head dim Ev", Ev)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{_FN}: {name} must be between 1 and {MAX_HEAD_DIM}, got {dim}")
    if key is not None:
        if tuple(key.shape) != (B, Hk, L, E) or tuple(value.shape) != (B, Hk, L, Ev):
            raise ValueError(
                f"{_FN}: expected key {(B, Hk, L, E)} and value {(B, Hk, L, Ev)}, got {tuple(key.shape)} and "
                f"{tuple(value.shape)}"
            )
        if cache_seqlens is None:
            raise ValueError(f"{_FN}: key and value are appended at cache_seqlens: expected cache_seqlens, got None")
    if cache_seqlens is not None:
        if cache_seqlens.device != query.device:
            raise ValueError(f"{_FN}: expected cache_seqlens on {query.device} like query, got {cache_seqlens.device}")
        if cache_seqlens.is_floating_point() or cache_seqlens.is_complex() or cache_seqlens.dtype == torch.bool:
            raise TypeError(f"{_FN}: expected integer cache_seqlens, got {cache_seqlens.dtype}")
        if tuple(cache_seqlens.shape) != (B,):
            raise ValueError(f"{_FN}: expected cache_seqlens of shape ({B},), got {tuple(cache_seqlens.shape)}")
    if torch.is_grad_enabled() and any(t.requires_grad for _, t in tensors):
        raise RuntimeError(
            f"{_FN} is inference only and gives no gradient, but an input requires grad: call it under "
            "torch.no_grad() or torch.inference_mode(), or detach the inputs"
        )


def _as_lengths(cache_seqlens, query):
    if isinstance(cache_seqlens, bool):
        raise TypeError(f"{_FN}: expected cache_seqlens to be an int, an integer tensor or None, got a bool")
    if isinstance(cache_seqlens, int):
        return torch.full((query.shape[0],), cache_seqlens, dtype=torch.int32, device=query.device)
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"{_FN}: expected cache_seqlens to be an int, an integer tensor or None, got "
                        f"{type(cache_seqlens).__name__}")
    return cache_seqlens


def _check_lengths(cache_seqlens, L: int, S_max: int, append: bool) -> None:
    """The checks on the lengths' values, for the reference path (the C++ op makes its own)."""
    if cache_seqlens is None:
        return
    for b, n in enumerate(cache_seqlens.tolist()):
        if n < 0:
            raise ValueError(f"{_FN}: expected cache_seqlens >= 0, got {n} for sequence {b}")
        if n + (L if append else 0) > S_max:
            more = f" entries and gets {L} more" if append else " entries"
            raise ValueError(f"{_FN}: the cache overflows: sequence {b} holds {n}{more}, more than S_max = {S_max}")


def _request(query, k_cache, v_cache, key=None, value=None, *, cache_seqlens=None, is_causal=True, scale=None):
    cache_seqlens = _as_lengths(cache_seqlens, query)
    _check(query, k_cache, v_cache, key, value, cache_seqlens)
    return backends.Request("attention_with_kv_cache", query.device, query.dtype)


def attention_with_kv_cache(
    query: torch.Tensor,  # (B, Hq, L, E)
    k_cache: torch.Tensor,  # (B, Hk, S_max, E)
    v_cache: torch.Tensor,  # (B, Hk, S_max, Ev)
    key: torch.Tensor | None = None,  # (B, Hk, L, E)
    value: torch.Tensor | None = None,  # (B, Hk, L, Ev)
    *,
    cache_seqlens: torch.Tensor | int | None = None,  # (B,) int
    is_causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:  # (B, Hq, L, Ev)
    """Attention of new queries against a KV cache, appending the new keys and values in place.

    Args:
        query: ``(B, Hq, L, E)``: the L new tokens' queries (L = 1 in a decode step).
        k_cache: ``(B, Hk, S_max, E)``; ``Hq`` a multiple of ``Hk`` (grouped-query attention).
        v_cache: ``(B, Hk, S_max, Ev)``.
        key, value: ``(B, Hk, L, E)`` and ``(B, Hk, L, Ev)``, or both None. When given, written into the
            caches in place at ``[cache_seqlens[b], cache_seqlens[b] + L)``.
        cache_seqlens: ``(B,)`` integer tensor on query's device, or an int for every sequence: the valid
            entries each sequence holds before this call. None means every sequence holds ``S_max``
            (then key and value must be None).
        is_causal: aligned bottom-right: query ``i`` of sequence ``b`` sees cache entries
            ``j <= n_b - L + i``, where ``n_b`` is the number of entries after the append (the last
            query sees them all). Without it every query sees all ``n_b`` entries.
        scale: the scores' factor; ``1/sqrt(E)`` when None.

    Returns ``(B, Hq, L, Ev)`` in query's dtype. Entries past ``n_b`` are never read, so a cache may hold
    anything there; a query with no entry to see gives 0. Inference only: raises if an input requires
    grad. A cache overflow (``n_b > S_max``), negative lengths, or wrong shapes, dtypes or devices raise
    before anything is written. fp32, bf16, fp16 and (CPU) fp64; bf16/fp16 caches are read in their dtype.
    """
    cache_seqlens = _as_lengths(cache_seqlens, query)
    _check(query, k_cache, v_cache, key, value, cache_seqlens)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{_FN}: expected scale to be a finite number or None, got {scale!r}")
    scale_value = float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    backend = backends.select(backends.Request("attention_with_kv_cache", query.device, query.dtype))
    if backend == "reference":
        _check_lengths(cache_seqlens, query.shape[2], k_cache.shape[2], key is not None)
        return reference.attention_with_kv_cache(
            query, k_cache, v_cache, key, value, cache_seqlens, is_causal, scale_value
        )
    return backends.call(
        getattr(torch.ops.fusedformer, _OPS[backend]).default,
        query, k_cache, v_cache, key, value, cache_seqlens, bool(is_causal), scale_value,
    )
