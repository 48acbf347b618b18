"""The ``torch.nn`` side of ``ff.patch``: instances of exactly the ``torch.nn`` classes that have a fused
twin in ``fusedformer.nn`` get their class swapped to it (the twin adds no state)."""

from __future__ import annotations

from torch import nn

from fusedformer.nn.transformer import FUSED_CLASSES, to_fused_
from fusedformer.patching.report import PatchState

__all__ = ["swap_torch_modules", "torch_left_reason"]


def swap_torch_modules(model: nn.Module, state: PatchState, paths: dict[int, str], handled: set[int]) -> None:
    """Swaps every ``torch.nn`` module of ``FUSED_CLASSES`` in ``model``; records each in ``state``."""
    report = state.report

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


def torch_left_reason(m: nn.Module) -> str | None:
    """Why a module that is a ``torch.nn`` class of ``FUSED_CLASSES`` (a subclass of one) was left, or None."""
    if isinstance(m, tuple(FUSED_CLASSES.values())):
        return None
    if type(m) is nn.modules.linear.NonDynamicallyQuantizableLinear:
        return None  # MultiheadAttention's out_proj: the attention module (fused or not) applies its weights
    torch_base = next((b for b in FUSED_CLASSES if isinstance(m, b)), None)
    if torch_base is None:
        return None
    return f"a subclass of torch.nn.{torch_base.__name__} ({type(m).__name__}) may override forward; left as is"
