"""``ff.patch(verify=True)``: a sample batch for a model, and the before/after comparison of its outputs."""

from __future__ import annotations

import math

import torch
from torch import nn

from fusedformer import handover
from fusedformer.patching.hf import transformers_module

__all__ = ["VERIFY_TOLERANCES", "PatchVerificationError", "build_sample_inputs", "run", "padding", "compare"]

#: (atol, rtol) per output dtype for ``verify=True``: |after - before| <= atol + rtol * |before|
VERIFY_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


class PatchVerificationError(AssertionError):
    """``patch(verify=True)``: the patched model's outputs differ from the original's beyond tolerance."""



def param_like(model: nn.Module) -> dict:
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
    transformers = transformers_module()
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

    like = param_like(model)

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


def tensors(out) -> list[torch.Tensor]:
    """The tensors in a model's output (a tensor, a tuple/list, a dict or a transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in tensors(v)]
    return []  # caches and other objects are not outputs to compare


def run(model: nn.Module, inputs) -> list[torch.Tensor]:
    """Runs ``model`` on ``inputs`` in eval mode without grad, restoring every module's training flag.
    Small calls are not handed to torch (``fusedformer.handover.off``): the check is of the fused kernels."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), handover.off():
            if isinstance(inputs, dict):
                out = model(**inputs)
            elif isinstance(inputs, (tuple, list)):
                out = model(*inputs)
            else:
                out = model(inputs)
    finally:
        for m, training in modes:
            m.training = training
    return [t.detach().clone() for t in tensors(out)]


def padding(inputs: object) -> torch.Tensor | None:
    """The padded positions, ``(B, L)`` bool, of a keyword batch with a 2-d ``attention_mask`` (0 = padding)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not mask.is_floating_point():
        return mask == 0
    return None


def compare(before: list[torch.Tensor], after: list[torch.Tensor], atol, rtol, padding=None) -> float:
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

