"""The Hugging Face ``transformers`` side of ``ff.patch``: GELU modules, attention through the library's
``AttentionInterface``, and RMSNorm classes (Llama, Mistral, Qwen2, Gemma, T5).

Nothing here imports ``transformers`` unless the user's program already did (a model of it can exist
only then).
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

from fusedformer import handover
from fusedformer.nn.activation import GELU
from fusedformer.nn.linear import conv1d_twin
from fusedformer.ops.attention import scaled_dot_product_attention
from fusedformer.ops.rms_norm import rms_norm
from fusedformer.ops.varlen import varlen_attention
from fusedformer.patching.report import PatchState, module_path

__all__ = [
    "ATTN_IMPLEMENTATION",
    "HF_ATTENTION_KIND",
    "fusedformer_attention_forward",
    "fusedformer_attention_mask",
    "hf_gelu_classes",
    "patch_transformers",
    "transformers_module",
]

ATTN_IMPLEMENTATION = "fusedformer"
HF_ATTENTION_KIND = "attention (transformers AttentionInterface)"
# Inference calls of at most this many scores (B x Hq x L x S) may be handed to torch's SDPA where that
# measured faster (fusedformer.handover): a 14-token sentence's attention costs what its dispatch costs
HANDOVER_MAX_SCORES = 1 << 18


def transformers_module():
    """The ``transformers`` module if the user's program imported it (a model of it can exist only then)."""
    return sys.modules.get("transformers")


def hf_gelu_classes() -> tuple[dict[type, str], dict[type, str]]:
    """transformers' GELU modules: {class: approximate} that ``ff.gelu`` computes, {class: why not} for the rest."""
    from transformers import activations

    fused = {
        "GELUActivation": "none",  # F.gelu, or the same erf formula in Python
        "GELUTanh": "tanh",  # F.gelu(approximate="tanh"), or the same formula in Python
        "PytorchGELUTanh": "tanh",
        "NewGELUActivation": "tanh",  # "gelu_new": the tanh formula in Python
        "FastGELUActivation": "tanh",  # the tanh formula with sqrt(2/pi) rounded to 0.7978845608
        "AccurateGELUActivation": "tanh",  # the tanh formula
    }
    left = {
        "QuickGELUActivation": "quick_gelu is x*sigmoid(1.702x), not GELU: no fused kernel",
        "ClippedGELUActivation": "clipped GELU (GELU then clamp) has no fused kernel",
    }

    def resolve(names: dict[str, str]) -> dict[type, str]:  # the names this transformers version has
        return {getattr(activations, n): v for n, v in names.items() if hasattr(activations, n)}

    return resolve(fused), resolve(left)


def _varlen_forward(module, query, key, value, cu_q, cu_k, kwargs, dropout, scaling, is_causal) -> torch.Tensor:
    """(1, Hq, total_q, E) packed queries -> (1, total_q, Hq, Ev) through ``ff.varlen_attention``."""
    if query.shape[0] != 1:
        raise ValueError(
            f"fusedformer attention: cu_seq_lens_q/k describe sequences packed in one row, got a batch of "
            f"{query.shape[0]} rows"
        )

    def longest(name, cu):
        m = kwargs.get(name)
        return int(m) if m is not None else int(cu.diff().max())

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = varlen_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),  # (total, H, E)
        cu_q.to(torch.int32), cu_k.to(torch.int32), longest("max_length_q", cu_q), longest("max_length_k", cu_k),
        dropout_p=dropout, is_causal=bool(causal), scale=scaling,
    )  # (total_q, Hq, Ev)
    return out.unsqueeze(0)


def fusedformer_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (B, Hq, L, E)
    key: torch.Tensor,  # (B, Hk, S, E)
    value: torch.Tensor,  # (B, Hk, S, Ev)
    attention_mask: torch.Tensor
    | None,  # broadcastable to (B, Hq, L, S); bool (True = takes part) or additive
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,  # (1 | B, Hq, L, S), added to the scores (T5)
    **kwargs,
) -> tuple[torch.Tensor, None]:  # out (B, L, Hq, Ev), no weights
    """The ``"fusedformer"`` entry of transformers' ``AttentionInterface``: ``ff.scaled_dot_product_attention``.

    Follows transformers' ``sdpa_attention_forward`` argument for argument: ``is_causal`` (else the
    module's) applies only without a mask and for more than one query; grouped-query attention from
    ``module.num_key_value_groups``; T5's ``position_bias`` joins the mask (masked entries get the dtype's
    minimum, as there); the output is transposed to ``(B, L, H, Ev)``. Attention weights are never
    materialised, so none are returned (as with ``sdpa``).
    """
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(
                f"fusedformer attention does not support `{unsupported}`; use another attn_implementation"
            )
    if kwargs.get("cache") is not None:
        raise ValueError("fusedformer attention does not support a paged cache (continuous batching)")

    enable_gqa = getattr(module, "num_key_value_groups", 1) > 1
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and position_bias is None:
        # a padding-free batch: the sequences packed in one row (1, H, total, E), their cumulative lengths
        # given as to flash-attention implementations: varlen attention, no mask, no padding
        return _varlen_forward(module, query, key, value, cu_q, cu_k, kwargs, dropout, scaling, is_causal), None
    L = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(L > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > L:
        # prefill into an empty static cache: the keys past L are empty slots (as transformers' sdpa crops them)
        key, value = key[:, :, :L], value[:, :, :L]
        if position_bias is not None:
            position_bias = position_bias[..., :L]

    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    if position_bias is not None:
        bias = position_bias.to(query.dtype)
        if mask is None:
            mask = bias  # is_causal, if set, still applies: the fused op takes both
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, bias, torch.finfo(query.dtype).min)  # (B, Hq, L, S)
        else:
            mask = bias + mask  # (B, Hq, L, S)

    if (
        dropout == 0.0
        and not torch.is_grad_enabled()
        and not (is_causal and mask is not None)  # torch's SDPA takes one of the two
        and not torch.compiler.is_compiling()
        and _torch_serves(module, query, key, value, mask, is_causal, scaling, enable_gqa)
    ):
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa
        )
    else:
        out = scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=is_causal,
            scale=scaling,
            enable_gqa=enable_gqa,
        )  # (B, Hq, L, Ev)
    return out.transpose(1, 2).contiguous(), None  # (B, L, Hq, Ev)


def _torch_serves(module, query, key, value, mask, is_causal, scaling, enable_gqa) -> bool:
    """Whether torch's SDPA serves this small inference call (``fusedformer.handover``, op
    ``"attention"``): measured once per class (query's dtype, E and size class; the key count's power of
    two; heads, Ev, the mask's kind and is_causal), then read from the attention module's memo. Both
    sides are timed with the output merge back to ``(B, L, H, Ev)`` that the caller does. Torch's SDPA
    gives what ours does on these calls, a fully masked row included (0)."""
    mask_kind = None if mask is None else (mask.dtype, tuple(mask.shape[:2]))
    options = (key.shape[2].bit_length(), query.shape[1], key.shape[1], value.shape[-1], mask_kind, is_causal)
    memo_key = handover.memo_key(query) + options + (scaling, enable_gqa)
    memo = module.__dict__.get("_ff_handover")
    use = memo.get(memo_key) if memo is not None else None
    if use is not None:
        return use
    kwargs = dict(attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa)

    def pair():
        return (
            lambda x: scaled_dot_product_attention(x, key, value, **kwargs).transpose(1, 2).contiguous(),
            lambda x: F.scaled_dot_product_attention(x, key, value, **kwargs).transpose(1, 2).contiguous(),
        )

    # too large to measure cheaply, or a tensor subclass: fused (and remembered)
    allowed = (
        query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] <= HANDOVER_MAX_SCORES
        and type(key) is torch.Tensor
        and type(value) is torch.Tensor
    )
    return handover.module_decides(module, memo_key, query, "attention", options, pair, allowed=allowed)


def fusedformer_attention_mask(*args, **kwargs):
    """The ``"fusedformer"`` entry of transformers' ``AttentionMaskInterface``.

    ``ff.scaled_dot_product_attention`` reads masks as torch's SDPA does (bool, True = takes part; is_causal
    top-left), so this is transformers' ``sdpa_mask``: ``(B, 1, L, S)`` bool, or None where ``is_causal``
    (or no mask at all) says the same.
    """
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def _registertransformers_module() -> None:
    """Adds ``"fusedformer"`` to transformers' attention and mask interfaces (new names; nothing replaced)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, fusedformer_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, fusedformer_attention_mask)


def _hf_attention_leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """transformers attention modules that call the interface: ``*Attention`` classes holding a ``config``,
    with no such module inside them (``BertAttention`` wraps ``BertSelfAttention``, which is the one)."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__name__.endswith("Attention")
        and hasattr(m, "config")
        and not isinstance(m, nn.MultiheadAttention)
    ]
    names = [n for n, _ in found]
    return [(n, m) for n, m in found if not any(o != n and o.startswith(n + ".") for o in names)]


def _switch_hf_attention(model: nn.Module, state: PatchState) -> set[int]:
    """Copies every transformers config the model's modules hold, points them at the copies, and sets
    ``_attn_implementation = "fusedformer"`` through each outermost ``PreTrainedModel``'s
    ``set_attn_implementation``. Returns the ids of the attention modules now served by fusedformer."""
    transformers = transformers_module()
    config_cls = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    ptm_cls = transformers.PreTrainedModel

    owners = [
        (m, attr, v) for m in model.modules() for attr, v in vars(m).items() if isinstance(v, config_cls)
    ]
    if not owners:
        return set()
    originals = list({id(v): v for _, _, v in owners}.values())
    # one deepcopy call, one memo: sub-configs shared between configs stay shared between the copies
    copies = dict(zip((id(c) for c in originals), copy.deepcopy(originals)))
    for m, attr, v in owners:
        setattr(m, attr, copies[id(v)])
        state.configs.append((m, attr, v))

    _registertransformers_module()
    roots, root_names = [], []
    for name, m in model.named_modules():
        if isinstance(m, ptm_cls) and not any(name.startswith(r + ".") or r == "" for r in root_names):
            roots.append(m)
            root_names.append(name)
    for root in roots:
        root.set_attn_implementation(ATTN_IMPLEMENTATION)
    return {
        id(m)
        for _, m in _hf_attention_leaves(model)
        if getattr(m.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
    }



# ---- RMSNorm classes ----------------------------------------------------------------------------

# transformers' RMSNorm classes by name, each with how its forward is written: "llama" normalises in
# float32, casts to the input's dtype, then multiplies by weight (weight · x̂.to(dtype)); "gemma"
# multiplies by (1 + weight) in float32 and casts once; "t5" multiplies x (its own dtype) by the float32
# rstd, casts to a half weight's dtype, then multiplies by weight. Each keeps its epsilon in
# `variance_epsilon` ("llama", "t5") or `eps` ("gemma").
HF_RMS_NORMS: dict[str, str] = {
    "LlamaRMSNorm": "llama",
    "MistralRMSNorm": "llama",
    "MixtralRMSNorm": "llama",
    "Qwen2RMSNorm": "llama",
    "Qwen3RMSNorm": "llama",
    "GemmaRMSNorm": "gemma",
    "Gemma2RMSNorm": "gemma",
    "T5LayerNorm": "t5",
    "MT5LayerNorm": "t5",
}


def _llama_rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (*, D) -> (*, D)
    """``LlamaRMSNorm.forward`` through ``ff.rms_norm``: float32 statistics, result in the input's dtype,
    times weight; fused into one pass where weight has the input's dtype (one rounding instead of two)."""
    shape = (hidden_states.shape[-1],)
    if self.weight.dtype == hidden_states.dtype:
        return rms_norm(hidden_states, shape, self.weight, self.variance_epsilon)
    return self.weight * rms_norm(hidden_states, shape, None, self.variance_epsilon)  # promotes, as Llama's


def _gemma_rms_forward(self, x: torch.Tensor) -> torch.Tensor:  # (*, D) -> (*, D)
    """``GemmaRMSNorm.forward`` through ``ff.rms_norm``: weight applied as ``1 + w`` (formed in float32, then
    rounded to x's dtype, where Gemma keeps it float32: one extra rounding of the weight for bf16/fp16)."""
    w = (1.0 + self.weight.float()).to(x.dtype)
    return rms_norm(x, (x.shape[-1],), w, self.eps)


def _t5_rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (*, D) -> (*, D)
    """``T5LayerNorm.forward`` (RMS, no mean, no bias) through ``ff.rms_norm``; T5's dtypes: the result
    takes a half weight's dtype, else float32 promotion as ``weight * (x * rstd)``."""
    shape = (hidden_states.shape[-1],)
    if self.weight.dtype == hidden_states.dtype:
        return rms_norm(hidden_states, shape, self.weight, self.variance_epsilon)
    y = rms_norm(hidden_states.float(), shape, None, self.variance_epsilon)  # T5 computes x·rstd in float32
    if self.weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(self.weight.dtype)
    return self.weight * y


_FORWARDS = {"llama": _llama_rms_forward, "gemma": _gemma_rms_forward, "t5": _t5_rms_forward}
_TWINS: dict[type, type] = {}


def _fused_twin(cls: type, style: str) -> type:
    """A subclass of the transformers class whose forward runs ``ff.rms_norm``: no new state, so an
    instance's class can be swapped to it and back."""
    if cls not in _TWINS:
        _TWINS[cls] = type(
            f"Fused{cls.__name__}",
            (cls,),
            {"forward": _FORWARDS[style], "__module__": __name__, "__doc__": _FORWARDS[style].__doc__},
        )
    return _TWINS[cls]


def _rms_norm_style(m: nn.Module) -> str | None:
    cls = type(m)
    style = HF_RMS_NORMS.get(cls.__name__)
    if style is None or not cls.__module__.startswith("transformers."):
        return None
    eps_attr = "eps" if style == "gemma" else "variance_epsilon"
    weight = getattr(m, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not hasattr(m, eps_attr):
        return None  # not the shape this table knows: left, and reported as a norm with no fused kernel
    return style


def swap_rms_norms(model: nn.Module, state: PatchState, paths: dict[int, str], handled: set[int]) -> None:
    """Swaps the class of every known transformers RMSNorm in ``model`` to its fused twin."""
    for m in model.modules():
        style = _rms_norm_style(m)
        if style is None or id(m) in handled:
            continue
        original = type(m)
        m.__class__ = _fused_twin(original, style)
        state.swapped.append((m, original))
        state.report.replaced.setdefault(f"{original.__name__} -> ff.rms_norm", []).append(paths[id(m)])
        handled.add(id(m))


def swap_conv1d(model: nn.Module, state: PatchState, paths: dict[int, str], handled: set[int]) -> None:
    """Swaps the class of every transformers ``Conv1D`` (GPT-2's linear layers; exactly that class, not a
    subclass, which may override forward) to its measured twin (``fusedformer.nn.linear.conv1d_twin``)."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is None:
        return
    for m in model.modules():
        if type(m) is not conv1d or id(m) in handled:
            continue
        m.__class__ = conv1d_twin(conv1d)
        state.swapped.append((m, conv1d))
        state.report.replaced.setdefault("Conv1D -> ff.linear (measured)", []).append(paths[id(m)])
        handled.add(id(m))


# ---- everything transformers --------------------------------------------------------------------


def patch_transformers(model: nn.Module, state: PatchState, paths: dict[int, str], handled: set[int]) -> None:
    """The transformers part of ``ff.patch``: GELU modules replaced, RMSNorm classes swapped, attention
    switched to ``"fusedformer"``; adds what it handles to ``handled``."""
    transformers = transformers_module()
    if transformers is None:
        return
    report = state.report
    fused_gelu, _ = hf_gelu_classes()
    replacements: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            approximate = fused_gelu.get(type(child)) if child is not None else None
            if approximate is None:
                continue
            if id(child) not in replacements:
                replacements[id(child)] = GELU(approximate)
                report.replaced.setdefault(f"{type(child).__name__} -> GELU({approximate!r})", []).append(
                    paths[id(child)]
                )
                handled.add(id(child))
            parent._modules[name] = replacements[id(child)]
            state.replaced.append((parent, name, child))
    swap_rms_norms(model, state, paths, handled)
    swap_conv1d(model, state, paths, handled)

    if not any(isinstance(m, transformers.PreTrainedModel) for m in model.modules()):
        return
    served = _switch_hf_attention(model, state)
    for name, m in _hf_attention_leaves(model):
        if id(m) in served:
            report.replaced.setdefault(HF_ATTENTION_KIND, []).append(module_path(name))
            handled.add(id(m))
    if any(getattr(m, "has_relative_attention_bias", False) and id(m) in served for m in model.modules()):
        report.notes.append(
            "T5-style relative position bias is a learned float mask: while it requires grad (training), those "
            "attention calls run on the reference path (the fused kernels give no mask gradient); "
            "inference runs fused"
        )
