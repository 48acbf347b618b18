"""Swap fused modules into an existing model, in place, and undo it: ``ff.patch(model)`` / ``ff.unpatch(model)``.

One module per job: ``torch_nn`` (the torch.nn swap), ``hf`` (the Hugging Face integration), ``verify``
(``verify=True``), ``report`` (the report and the undo state); this one runs them in order.

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
  ``_attn_implementation`` touches no other model built from the same config object. The RMSNorm classes
  (``LlamaRMSNorm`` and the same-shaped ``Mistral``/``Mixtral``/``Qwen2``/``Qwen3`` ones, ``GemmaRMSNorm``
  (weight applied as 1 + w), ``T5LayerNorm``) get their class swapped to a twin whose forward runs
  ``ff.rms_norm`` with the model's own dtype handling (``fusedformer.patching.hf``).

Anything that looks like a normalisation, GELU or attention but is none of the above is left in place
and listed in the report with the reason. ``ff.unpatch(model)`` restores the original classes, modules and
configs (the parameters were never copied, so training done while patched is kept).
"""

from __future__ import annotations

import re

from torch import nn

from fusedformer.nn.transformer import FUSED_CLASSES
from fusedformer.patching import hf, verify as _verify
from fusedformer.patching.hf import ATTN_IMPLEMENTATION, HF_ATTENTION_KIND, hf_gelu_classes, transformers_module
from fusedformer.patching.report import STATE_ATTR, PatchReport, PatchState, module_path
from fusedformer.patching.torch_nn import swap_torch_modules, torch_left_reason
from fusedformer.patching.verify import VERIFY_TOLERANCES, PatchVerificationError, build_sample_inputs

__all__ = [
    "ATTN_IMPLEMENTATION",
    "HF_ATTENTION_KIND",
    "VERIFY_TOLERANCES",
    "PatchReport",
    "PatchVerificationError",
    "build_sample_inputs",
    "is_patched",
    "patch",
    "unpatch",
]

_LOOKS_RELEVANT = re.compile(r"norm|gelu|attention|attn", re.IGNORECASE)


def _undo(model: nn.Module, state: PatchState) -> None:
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
            keyword arguments; by default built by ``fusedformer.patching.build_sample_inputs(model)``.
        atol, rtol: override the per-dtype tolerances of ``verify``.

    See the module doc for what is replaced. ``print(report)`` says what was replaced (per kind, with module
    paths) and what was left and why. Patching a model twice raises; ``ff.unpatch(model)`` undoes it.
    While patched, a transformers model's ``config`` is a copy (with ``_attn_implementation="fusedformer"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedformer.patch: expected a torch.nn.Module, got {type(model).__name__}")
    if STATE_ATTR in vars(model):
        raise RuntimeError(
            "fusedformer.patch: this model is already patched; call fusedformer.unpatch(model) first"
        )

    if verify:
        inputs = sample_inputs if sample_inputs is not None else build_sample_inputs(model)
        before = _verify.run(model, inputs)

    state = PatchState()
    report = state.report
    paths = {id(m): module_path(name) for name, m in model.named_modules()}
    try:
        handled = _patch_modules(model, state, paths)
        _report_left(model, report, handled)
    except BaseException:
        _undo(model, state)
        raise
    vars(model)[STATE_ATTR] = state

    if verify:
        try:
            report.max_abs_diff = _verify.compare(before, _verify.run(model, inputs), atol, rtol, _verify.padding(inputs))
        except BaseException:
            unpatch(model)
            raise
    return report


def _patch_modules(model: nn.Module, state: PatchState, paths: dict[int, str]) -> set[int]:
    """Does the replacing; returns the ids of the modules handled (replaced, swapped or served)."""
    handled: set[int] = set()
    swap_torch_modules(model, state, paths, handled)
    hf.patch_transformers(model, state, paths, handled)
    return handled


def _report_left(model: nn.Module, report: PatchReport, handled: set[int]) -> None:
    """Lists the modules that look like a normalisation, GELU or attention and were not handled, with why."""
    fused_classes = tuple(FUSED_CLASSES.values())
    _, hf_left = hf_gelu_classes() if transformers_module() is not None else ({}, {})
    named = list(model.named_modules())
    for name, m in named:
        if id(m) in handled or isinstance(m, fused_classes):
            continue
        cls = type(m)
        torch_why = torch_left_reason(m)
        if torch_why is not None:
            why = torch_why
        elif cls in hf_left:
            why = hf_left[cls]
        elif _LOOKS_RELEVANT.search(cls.__name__):
            inner = [n for n, o in named if n.startswith(name + ".") and id(o) in handled] if name else []
            if inner or not name:
                continue  # a container of handled modules (or the model itself)
            lname = cls.__name__.lower()
            if "norm" in lname:
                why = (
                    f"{cls.__name__} is neither torch.nn.LayerNorm nor an RMSNorm class fusedformer knows "
                    "(fusedformer.patching.hf.HF_RMS_NORMS): no fused kernel"
                )
            elif "gelu" in lname:
                why = f"{cls.__name__} is not a GELU fusedformer knows: left as is"
            elif hasattr(m, "config") and transformers_module() is not None:
                impl = getattr(m.config, "_attn_implementation", None)
                why = (
                    f"attention implementation stayed {impl!r}: {cls.__name__} does not dispatch through "
                    "transformers' AttentionInterface"
                )
            else:
                why = f"{cls.__name__} is not an attention fusedformer can serve (no torch.nn or AttentionInterface dispatch)"
        else:
            continue
        report.left.append((module_path(name), why))


def unpatch(model: nn.Module) -> None:
    """Undoes ``ff.patch(model)``: the original classes, modules and configs come back (same parameters)."""
    state = vars(model).pop(STATE_ATTR, None)
    if state is None:
        raise ValueError("fusedformer.unpatch: this model was not patched by fusedformer.patch")
    _undo(model, state)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by ``ff.patch``."""
    return STATE_ATTR in vars(model)