"""Swap fused modules into an existing model, in place, and undo it: ``ff.patch(model)`` / ``ff.unpatch(model)``.

What is replaced, on that model instance only (no class or library is monkey-patched):

- ``torch.nn.LayerNorm``, ``GELU``, ``MultiheadAttention``, ``TransformerEncoderLayer``,
  ``TransformerDecoderLayer``, ``TransformerEncoder``, ``TransformerDecoder``, ``Transformer`` (exactly
  those classes; subclasses may override ``forward`` and are left, with the reason): each instance's class
  becomes its fused twin (``fusedformer.nn``), which adds no state, so the parameters, hooks, object
  identity and any optimizer built on them stay as they are.
- In Hugging Face ``transformers`` models: ``nn.LayerNorm`` as above; the GELU activation modules
  (exact ``GELUActivation``; the tanh variants ``GELUTanh``, ``NewGELUActivation`` ("gelu_new"),
  ``FastGELUActivation``, ``AccurateGELUActivation``) become ``ff.nn.GELU``; attention goes through the
  library's own ``AttentionInterface`` under the name ``"fusedformer"``, with its mask function
  registered under the same name in ``AttentionMaskInterface`` (without that, ``transformers`` builds
  no padding mask for an unknown implementation). The model's configs are copied first, so that switching
  ``_attn_implementation`` touches no other model built from the same config object.

Anything that looks like a normalisation, GELU or attention but is none of the above is left in place
and listed in the report with the reason. ``ff.unpatch(model)`` restores the original classes, modules and
configs (the parameters were never copied, so training done while patched is kept).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys

import torch
from torch import nn

from fusedformer.nn.activation import GELU
from fusedformer.nn.transformer import FUSED_CLASSES, to_fused_
from fusedformer.ops.attention import scaled_dot_product_attention

__all__ = [
    "VERIFY_TOLERANCES",
    "PatchReport",
    "PatchVerificationError",
    "build_sample_inputs",
    "is_patched",
    "patch",
    "unpatch",
]

ATTN_IMPLEMENTATION = "fusedformer"
_STATE = "_fusedformer_patch"

#: (atol, rtol) per output dtype for ``verify=True``: |after - before| <= atol + rtol * |before|
VERIFY_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

_HF_ATTENTION_KIND = "attention (transformers AttentionInterface)"
_LOOKS_RELEVANT = re.compile(r"norm|gelu|attention|attn", re.IGNORECASE)


class PatchVerificationError(AssertionError):
    """``patch(verify=True)``: the patched model's outputs differ from the original's beyond tolerance."""


@dataclasses.dataclass
class PatchReport:
    """What ``ff.patch`` replaced (kind -> module paths), what it left (path, reason), and notes."""

    replaced: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    max_abs_diff: float | None = None  # set by verify=True

    @property
    def num_replaced(self) -> int:
        return sum(len(paths) for paths in self.replaced.values())

    def __str__(self) -> str:
        def shown(paths: list[str]) -> str:
            return ", ".join(paths[:6]) + (f", ... ({len(paths) - 6} more)" if len(paths) > 6 else "")

        lines = [f"fusedformer.patch: replaced {self.num_replaced} module(s), left {len(self.left)}"]
        for kind, paths in self.replaced.items():
            lines.append(f"  {kind} x{len(paths)}: {shown(paths)}")
        if self.left:
            lines.append("left in place:")
            by_reason: dict[str, list[str]] = {}
            for path, why in self.left:
                by_reason.setdefault(why, []).append(path)
            for why, paths in by_reason.items():
                lines.append(f"  x{len(paths)} {shown(paths)}: {why}")
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  {note}" for note in self.notes)
        if self.max_abs_diff is not None:
            lines.append(f"verified: outputs before and after agree (max |diff| = {self.max_abs_diff:.3g})")
        return "\n".join(lines)


@dataclasses.dataclass
class _PatchState:
    """Everything ``unpatch`` needs to undo, in the order it was done."""

    swapped: list[tuple[nn.Module, type]] = dataclasses.field(default_factory=list)
    replaced: list[tuple[nn.Module, str, nn.Module]] = dataclasses.field(default_factory=list)
    configs: list[tuple[nn.Module, str, object]] = dataclasses.field(default_factory=list)
    report: PatchReport = dataclasses.field(default_factory=PatchReport)


def _path(name: str) -> str:
    return name if name else "<model>"


# ---- Hugging Face transformers ------------------------------------------------------------------


def _transformers():
    """The ``transformers`` module if the user's program imported it (a model of it can exist only then)."""
    return sys.modules.get("transformers")


def _hf_gelu_classes() -> tuple[dict[type, str], dict[type, str]]:
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


def fusedformer_attention_mask(*args, **kwargs):
    """The ``"fusedformer"`` entry of transformers' ``AttentionMaskInterface``.

    ``ff.scaled_dot_product_attention`` reads masks as torch's SDPA does (bool, True = takes part; is_causal
    top-left), so this is transformers' ``sdpa_mask``: ``(B, 1, L, S)`` bool, or None where ``is_causal``
    (or no mask at all) says the same.
    """
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def _register_transformers() -> None:
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


def _switch_hf_attention(model: nn.Module, state: _PatchState) -> set[int]:
    """Copies every transformers config the model's modules hold, points them at the copies, and sets
    ``_attn_implementation = "fusedformer"`` through each outermost ``PreTrainedModel``'s
    ``set_attn_implementation``. Returns the ids of the attention modules now served by fusedformer."""
    transformers = _transformers()
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

    _register_transformers()
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


# ---- sample inputs and verification -------------------------------------------------------------


def _param_like(model: nn.Module) -> dict:
    p = next(iter(model.parameters()), None)
    if p is None:
        return {"dtype": torch.get_default_dtype()}
    dtype = p.dtype if p.is_floating_point() else torch.get_default_dtype()
    return {"device": p.device, "dtype": dtype}


def build_sample_inputs(model: nn.Module) -> dict | tuple:
    """A small batch for ``model``, built from its config or its dims (what ``verify=True`` runs).

    transformers text models: ``input_ids`` ``(2, 9)`` with an ``attention_mask`` that pads the second
    row's last 3 tokens (so the mask path is exercised), plus ``decoder_input_ids`` ``(2, 6)`` for
    encoder-decoders. ``torch.nn`` transformer modules: random inputs of their width, ``(B=2, L=7)``.
    Raises ``ValueError`` when it cannot tell; then pass ``sample_inputs=`` to ``patch``.
    """
    g = torch.Generator().manual_seed(0)
    transformers = _transformers()
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        config = model.config
        if getattr(model, "main_input_name", "input_ids") != "input_ids" or not hasattr(config, "vocab_size"):
            raise ValueError(
                f"ff.patch(verify=True) cannot build a sample batch for {type(model).__name__} "
                f"(main input {getattr(model, 'main_input_name', '?')!r}); pass sample_inputs="
            )
        device = next(model.parameters()).device
        low = min(4, config.vocab_size - 1)
        ids = torch.randint(low, config.vocab_size, (2, 9), generator=g).to(device)
        mask = torch.ones(2, 9, dtype=torch.long, device=device)
        mask[1, -3:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = torch.randint(low, config.vocab_size, (2, 6), generator=g).to(
                device
            )
        return inputs

    like = _param_like(model)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(**like)

    def seq(width: int, batch_first: bool, length: int = 7):
        return randn(2, length, width) if batch_first else randn(length, 2, width)

    m = model
    if isinstance(m, nn.LayerNorm):
        return (randn(2, 7, *m.normalized_shape),)
    if isinstance(m, nn.GELU):
        return (randn(2, 7, 16),)
    if isinstance(m, nn.MultiheadAttention):
        q = seq(m.embed_dim, m.batch_first)
        k, v = seq(m.kdim, m.batch_first, 5), seq(m.vdim, m.batch_first, 5)
        return {"query": q, "key": k, "value": v, "need_weights": False}
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
        attn = m.self_attn if isinstance(m, nn.TransformerEncoderLayer) else m.layers[0].self_attn
        return (seq(attn.embed_dim, attn.batch_first),)
    if isinstance(m, (nn.TransformerDecoderLayer, nn.TransformerDecoder)):
        attn = m.self_attn if isinstance(m, nn.TransformerDecoderLayer) else m.layers[0].self_attn
        return (seq(attn.embed_dim, attn.batch_first), seq(attn.embed_dim, attn.batch_first, 5))
    if isinstance(m, nn.Transformer):
        return (seq(m.d_model, m.batch_first), seq(m.d_model, m.batch_first, 5))
    raise ValueError(
        f"ff.patch(verify=True) cannot build a sample batch for {type(model).__name__}; pass sample_inputs= "
        "(a tensor, a tuple of positional arguments, or a dict of keyword arguments)"
    )


def _tensors(out) -> list[torch.Tensor]:
    """The tensors in a model's output (a tensor, a tuple/list, a dict or a transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []  # caches and other objects are not outputs to compare


def _run(model: nn.Module, inputs) -> list[torch.Tensor]:
    """Runs ``model`` on ``inputs`` in eval mode without grad, restoring every module's training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(inputs, dict):
                out = model(**inputs)
            elif isinstance(inputs, (tuple, list)):
                out = model(*inputs)
            else:
                out = model(inputs)
    finally:
        for m, training in modes:
            m.training = training
    return [t.detach().clone() for t in _tensors(out)]


def _padding(inputs: object) -> torch.Tensor | None:
    """The padded positions, ``(B, L)`` bool, of a keyword batch with a 2-d ``attention_mask`` (0 = padding)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not mask.is_floating_point():
        return mask == 0
    return None


def _compare(before: list[torch.Tensor], after: list[torch.Tensor], atol, rtol, padding=None) -> float:
    """The largest |after - before|; raises ``PatchVerificationError`` beyond tolerance.

    padding: ``(B, L)`` bool, True at padded tokens; an output that starts with (B, L) is compared at the
    real tokens only (a model's output at a padded position is not defined: transformers' attention
    lets a padded query attend like any other, and rounding there is free to differ)."""
    if len(before) != len(after):
        raise PatchVerificationError(
            f"the model returned {len(before)} tensors before patching, {len(after)} after"
        )
    worst = 0.0
    for i, (b, a) in enumerate(zip(before, after)):
        if b.shape != a.shape or b.dtype != a.dtype:
            raise PatchVerificationError(
                f"output {i}: {tuple(b.shape)} {b.dtype} before patching, {tuple(a.shape)} {a.dtype} after"
            )
        if not b.is_floating_point():
            if not torch.equal(a, b):
                raise PatchVerificationError(f"output {i} ({b.dtype}) differs after patching")
            continue
        default_atol, default_rtol = VERIFY_TOLERANCES.get(b.dtype, VERIFY_TOLERANCES[torch.float32])
        t_atol = default_atol if atol is None else atol
        t_rtol = default_rtol if rtol is None else rtol
        diff = (a.double() - b.double()).abs()
        both_nan = torch.isnan(a) & torch.isnan(b)
        diff = diff.masked_fill(both_nan, 0.0)
        if padding is not None and b.dim() >= 2 and tuple(b.shape[:2]) == tuple(padding.shape):
            pad = padding.to(b.device).reshape(*padding.shape, *([1] * (b.dim() - 2)))
            diff = diff.masked_fill(pad, 0.0)
        bad = ~(diff <= t_atol + t_rtol * b.double().abs())
        d = float(diff.max()) if diff.numel() else 0.0
        if bad.any():
            raise PatchVerificationError(
                f"output {i} {tuple(b.shape)} {b.dtype} differs after patching by max |diff| = "
                f"{d if not math.isnan(d) else 'nan'} at {int(bad.sum())} element(s) "
                f"(allowed: atol {t_atol:g} + rtol {t_rtol:g} * |before|)"
            )
        worst = max(worst, d)
    return worst


# ---- patch / unpatch ----------------------------------------------------------------------------


def _undo(model: nn.Module, state: _PatchState) -> None:
    for m, attr, original in reversed(state.configs):
        setattr(m, attr, original)
    for parent, name, original in reversed(state.replaced):
        parent._modules[name] = original
    for m, cls in reversed(state.swapped):
        m.__class__ = cls


def patch(
    model: nn.Module,
    *,
    verify: bool = False,
    sample_inputs: object = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> PatchReport:
    """Replaces, in place, this model's supported modules with fusedformer's and returns a ``PatchReport``.

    Args:
        model: a ``torch.nn.Module`` (a plain PyTorch model, a transformers model, or one holding them).
        verify: run the model (eval mode, no grad) on a sample batch before and after; if any output differs
            beyond ``VERIFY_TOLERANCES`` of its dtype, undo the patch and raise ``PatchVerificationError``
            naming the largest difference. Outputs shaped ``(B, L, ...)`` are compared at the batch's
            real tokens only when it has a 2-d ``attention_mask`` (0 = padding).
        sample_inputs: the batch for ``verify``: a tensor, a tuple of positional arguments or a dict of
            keyword arguments; by default built by ``fusedformer.patch.build_sample_inputs(model)``.
        atol, rtol: override the per-dtype tolerances of ``verify``.

    See the module doc for what is replaced. ``print(report)`` says what was replaced (per kind, with module
    paths) and what was left and why. Patching a model twice raises; ``ff.unpatch(model)`` undoes it.
    While patched, a transformers model's ``config`` is a copy (with ``_attn_implementation="fusedformer"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedformer.patch: expected a torch.nn.Module, got {type(model).__name__}")
    if _STATE in vars(model):
        raise RuntimeError(
            "fusedformer.patch: this model is already patched; call fusedformer.unpatch(model) first"
        )

    if verify:
        inputs = sample_inputs if sample_inputs is not None else build_sample_inputs(model)
        before = _run(model, inputs)

    state = _PatchState()
    report = state.report
    paths = {id(m): _path(name) for name, m in model.named_modules()}
    try:
        handled = _patch_modules(model, state, paths)
        _report_left(model, report, handled)
    except BaseException:
        _undo(model, state)
        raise
    vars(model)[_STATE] = state

    if verify:
        try:
            report.max_abs_diff = _compare(before, _run(model, inputs), atol, rtol, _padding(inputs))
        except BaseException:
            unpatch(model)
            raise
    return report


def _patch_modules(model: nn.Module, state: _PatchState, paths: dict[int, str]) -> set[int]:
    """Does the replacing; returns the ids of the modules handled (replaced, swapped or served)."""
    report = state.report
    handled: set[int] = set()

    def on_swap(m: nn.Module, original: type) -> None:
        state.swapped.append((m, original))
        report.replaced.setdefault(original.__name__, []).append(paths[id(m)])
        handled.add(id(m))

    to_fused_(model, on_swap)
    in_layers = {  # the layers call their attention with need_weights=False
        id(getattr(layer, name, None))
        for layer in model.modules()
        if isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
        for name in ("self_attn", "multihead_attn")
    }
    if any(isinstance(m, nn.MultiheadAttention) and id(m) not in in_layers for m, _ in state.swapped):
        report.notes.append(
            "MultiheadAttention: callers that keep torch's default need_weights=True run on the reference path "
            "(the weights need the probabilities); need_weights=False runs the fused kernel"
        )

    transformers = _transformers()
    if transformers is None:
        return handled

    fused_gelu, _ = _hf_gelu_classes()
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

    if not any(isinstance(m, transformers.PreTrainedModel) for m in model.modules()):
        return handled
    served = _switch_hf_attention(model, state)
    for name, m in _hf_attention_leaves(model):
        if id(m) in served:
            report.replaced.setdefault(_HF_ATTENTION_KIND, []).append(_path(name))
            handled.add(id(m))
    if any(getattr(m, "has_relative_attention_bias", False) and id(m) in served for m in model.modules()):
        report.notes.append(
            "T5-style relative position bias is a learned float mask: while it requires grad (training), those "
            "attention calls run on the reference path (the fused kernels give no mask gradient); "
            "inference runs fused"
        )
    return handled


def _report_left(model: nn.Module, report: PatchReport, handled: set[int]) -> None:
    """Lists the modules that look like a normalisation, GELU or attention and were not handled, with why."""
    fused_classes = tuple(FUSED_CLASSES.values())
    _, hf_left = _hf_gelu_classes() if _transformers() is not None else ({}, {})
    named = list(model.named_modules())
    for name, m in named:
        if id(m) in handled or isinstance(m, fused_classes):
            continue
        cls = type(m)
        torch_base = next((b for b in FUSED_CLASSES if isinstance(m, b)), None)
        if torch_base is not None:
            why = f"a subclass of torch.nn.{torch_base.__name__} ({cls.__name__}) may override forward; left as is"
        elif cls in hf_left:
            why = hf_left[cls]
        elif _LOOKS_RELEVANT.search(cls.__name__):
            inner = [n for n, o in named if n.startswith(name + ".") and id(o) in handled] if name else []
            if inner or not name:
                continue  # a container of handled modules (or the model itself)
            lname = cls.__name__.lower()
            if "norm" in lname:
                why = f"{cls.__name__} is not torch.nn.LayerNorm (an RMSNorm or another normalisation): no fused kernel"
            elif "gelu" in lname:
                why = f"{cls.__name__} is not a GELU fusedformer knows: left as is"
            elif hasattr(m, "config") and _transformers() is not None:
                impl = getattr(m.config, "_attn_implementation", None)
                why = (
                    f"attention implementation stayed {impl!r}: {cls.__name__} does not dispatch through "
                    "transformers' AttentionInterface"
                )
            else:
                why = f"{cls.__name__} is not an attention fusedformer can serve (no torch.nn or AttentionInterface dispatch)"
        else:
            continue
        report.left.append((_path(name), why))


def unpatch(model: nn.Module) -> None:
    """Undoes ``ff.patch(model)``: the original classes, modules and configs come back (same parameters)."""
    state = vars(model).pop(_STATE, None)
    if state is None:
        raise ValueError("fusedformer.unpatch: this model was not patched by fusedformer.patch")
    _undo(model, state)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by ``ff.patch``."""
    return _STATE in vars(model)
