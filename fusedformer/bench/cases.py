"""Benchmark cases: what is measured, with which inputs, by which provider.

A ``Spec`` names one case at one shape (plain data, so it crosses into the memory probe's process as
JSON). ``make_case(spec)`` turns it into a ``Case``, which builds the inputs once (seeded, shared by
all providers so they see the same numbers) and, per provider, a zero-argument forward callable and
the leaves whose gradients the backward fills. ``unit(case, provider, mode)`` wraps those into the
thing that is timed:

    fwd       forward only, under ``torch.no_grad()`` (inference: nothing is saved for a backward)
    bwd       ``out.backward(grad_out)`` alone; the forward that builds the graph runs in the untimed
              setup before every call, so each timed backward has a fresh graph
    fwd+bwd   forward (with grad) then backward, timed as one unit

``fusedformer-bench`` times bwd and fwd+bwd together with ``train_unit``: each call is one fwd+bwd
unit with a mark between forward and backward, and the mark-to-end interval is the bwd sample (a
fresh graph each call, as above, without paying for a second forward). The pytest-benchmark suites
use ``unit``.

Providers (the names are the house's): ``fusedformer`` (the public ``ff.*`` functions and
``fusedformer.nn`` modules), ``torch`` (``F.scaled_dot_product_attention``, ``F.layer_norm``,
``F.gelu(x + bias)``, ``F.rms_norm``, ``x + r`` then the norm for add + norm, ``torch.nn`` layers) and ``naive`` (``fusedformer.reference``: attention that
materialises the (L, S) scores). The varlen case has its own third provider, ``torch-loop``: a Python
loop of torch's SDPA over the sequences (its ``torch`` is SDPA on the padded batch with its mask). ``fusedformer`` is only fused when ``ff.explain`` says a fused
backend serves it; ``Case.backend`` says which backend that is, and the report marks the fallback.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import fusedformer as ff
from fusedformer import reference

__all__ = [
    "ALL_PROVIDERS",
    "CASES",
    "MODES",
    "ROW_CASES",
    "PROVIDERS",
    "Case",
    "Spec",
    "Unit",
    "make_case",
    "train_unit",
    "unit",
]

PROVIDERS = ("fusedformer", "torch", "naive")
ALL_PROVIDERS = (*PROVIDERS, "torch-loop", "read")  # with the varlen case's and the decode case's own
MODES = ("fwd", "bwd", "fwd+bwd")
CASES = (
    "attention", "decode", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "gelu", "linear", "encoder",
    "decoder", "varlen",
)  # fmt: skip
#: the cases of (rows, width) elementwise work, measured in bytes/s
ROW_CASES = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "gelu")

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_FP32 = 4  # bytes: the reference computes in float32 whatever the input dtype (float64 aside)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One case at one shape: ``case`` in CASES, shape ``params``, ``device`` and ``dtype`` by name."""

    case: str
    params: dict[str, Any]
    device: str = "cpu"
    dtype: str = "float32"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls(**json.loads(text))

    def replace(self, **params: Any) -> Spec:
        return dataclasses.replace(self, params={**self.params, **params})


@dataclasses.dataclass
class Unit:
    """What is timed: ``setup()`` (untimed) before each call, then ``run(state)`` (timed).

    A ``split`` unit is called ``run(state, mark)`` and calls ``mark()`` once, between its forward and
    its backward; the timer then also reports the time from the mark to the end: the backward alone.
    """

    run: Callable[..., None]
    setup: Callable[[], Any] | None = None
    split: bool = False


def _explained(fn: Callable | str, *args, **kwargs) -> tuple[str, bool]:
    """(backend, is_fallback) for one public call, by ``ff.explain``."""
    explanation = ff.explain(fn, *args, **kwargs)
    return explanation.backend, explanation.backend == "reference"


def _why_not_fused(fn: Callable | str, *args, **kwargs) -> str:
    """``ff.explain``'s reasons against every backend that does not serve the call, on one line."""
    e = ff.explain(fn, *args, **kwargs)
    return "; ".join(
        f"{name}: {', '.join(why)}" for name, why in e.reasons.items() if why and name != e.backend
    )


def _fmt_backend(backend: str, fallback: bool) -> str:
    return f"{backend} (FALLBACK)" if fallback else backend


class Case:
    """Base class: subclasses set ``providers`` and fill ``build``, ``forward_fn``, ``work``, ..."""

    name = ""
    providers: tuple[str, ...] = PROVIDERS

    def __init__(self, spec: Spec):
        self.spec = spec
        self.p = spec.params
        self.device = torch.device(spec.device)
        self.dtype = _DTYPES[spec.dtype]
        self.elt = torch.empty((), dtype=self.dtype).element_size()
        self._built = False
        self.grad_out: torch.Tensor | None = None

    # -- what subclasses provide --------------------------------------------------------------------
    def label(self) -> str:
        """Short human description of the shape, e.g. ``L=1024 causal``."""
        raise NotImplementedError

    def tiny(self) -> Spec:
        """The same case at a tiny size: run once first in a memory probe so lazy init is excluded."""
        raise NotImplementedError

    def work(self, mode: str) -> tuple[str, float]:
        """``("flop", n)`` or ``("byte", n)``: the count that throughput is computed from."""
        raise NotImplementedError

    def estimate_bytes(self, provider: str, mode: str) -> int:
        """Rough peak extra memory of one call: used only to skip calls the machine cannot hold."""
        return 0

    def backend(self, provider: str) -> str:
        """Which implementation serves ``provider``; fusedformer's fallbacks say FALLBACK."""
        return {"torch": "aten", "naive": "reference"}.get(provider, "?")

    def is_fallback(self, provider: str) -> bool:
        return False

    def fallback_reason(self) -> str:
        """Why fusedformer's fused backends do not serve this case (``ff.explain``'s reasons)."""
        return ""

    def unavailable(self, provider: str) -> str | None:
        """Why ``provider`` cannot run this case at all (None when it can)."""
        return None

    def build(self) -> None:
        raise NotImplementedError

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        raise NotImplementedError

    def leaves(self, provider: str) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------
    def ensure_built(self) -> None:
        if not self._built:
            torch.manual_seed(0)
            self.build()
            self._built = True

    def _randn(self, *shape: int, requires_grad: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, device=self.device, dtype=self.dtype)
        return t.requires_grad_(requires_grad)


# ---- attention ------------------------------------------------------------------------------------


def attention_scores(L: int, S: int, causal: bool) -> int:
    """The scores (query, key) pairs of one head that attention computes: L·S, or with the causal mask
    (top-left aligned as torch's: query i sees keys j <= i) the pairs it keeps, sum over i of min(i + 1, S).
    For L = S that is L(L+1)/2; for L > S the rows past S see every key; for L < S the keys past L are
    never seen."""
    if not causal:
        return L * S
    k = min(L, S)  # rows 0..k-1 see i + 1 keys, the other L - k rows see all S
    return k * (k + 1) // 2 + (L - k) * S


class AttentionCase(Case):
    """``q (B, H, L, E)``, ``k, v (B, H, S, E)``; causal or not; no mask, no dropout."""

    name = "attention"

    def __init__(self, spec: Spec):
        super().__init__(spec)
        p = self.p
        self.B, self.H, self.L, self.E = int(p["B"]), int(p["H"]), int(p["L"]), int(p["E"])
        self.S = int(p.get("S") or self.L)
        self.causal = bool(p["causal"])

    def label(self) -> str:
        return f"L={self.L} {'causal' if self.causal else 'full'}"

    def tiny(self) -> Spec:
        return self.spec.replace(B=1, H=2, L=32, S=32)

    def work(self, mode: str) -> tuple[str, float]:
        # FlashAttention's count, 4·E FLOPs per score for the forward (QK^T and PV), ×2.5 for the backward,
        # over the scores a causal kernel computes: attention_scores(L, S, causal), not half of L·S
        fwd = 4.0 * self.B * self.H * self.E * attention_scores(self.L, self.S, self.causal)
        return "flop", fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]

    def _scores_bytes(self) -> int:
        return self.B * self.H * self.L * self.S * _FP32

    def estimate_bytes(self, provider: str, mode: str) -> int:
        io = self.B * self.H * (self.L + 2 * self.S) * self.E * self.elt
        if provider == "naive" or (provider == "fusedformer" and self.is_fallback(provider)):
            # measured with the memory probe (float32, L = S = 1024 and 2048): the reference's forward
            # peaks at 3.0 (L, S) float32 buffers; with the backward, graph and all, at 3.15
            factor = {"fwd": 3.0, "bwd": 3.2, "fwd+bwd": 3.2}[mode]
            return int(factor * self._scores_bytes()) + 4 * io
        return 4 * io

    def _explain_args(self) -> tuple[tuple, dict]:
        q = torch.empty(self.B, self.H, self.L, self.E, device=self.device, dtype=self.dtype)
        k = torch.empty(self.B, self.H, self.S, self.E, device=self.device, dtype=self.dtype)
        return (ff.scaled_dot_product_attention, q, k, k), {"is_causal": self.causal}

    def _ff_explain(self) -> tuple[str, bool]:
        args, kwargs = self._explain_args()
        return _explained(*args, **kwargs)

    def fallback_reason(self) -> str:
        args, kwargs = self._explain_args()
        return _why_not_fused(*args, **kwargs)

    def backend(self, provider: str) -> str:
        if provider == "fusedformer":
            return _fmt_backend(*self._ff_explain())
        if provider == "torch":
            return _torch_sdpa_backend(self)
        return "reference"

    def is_fallback(self, provider: str) -> bool:
        return provider == "fusedformer" and self._ff_explain()[1]

    def build(self) -> None:
        B, H, L, S, E = self.B, self.H, self.L, self.S, self.E
        self.q = self._randn(B, H, L, E, requires_grad=True)  # (B, H, L, E)
        self.k = self._randn(B, H, S, E, requires_grad=True)  # (B, H, S, E)
        self.v = self._randn(B, H, S, E, requires_grad=True)  # (B, H, S, E)
        self.grad_out = self._randn(B, H, L, E)  # (B, H, L, E)

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        q, k, v, causal = self.q, self.k, self.v, self.causal
        fn = {
            "fusedformer": ff.scaled_dot_product_attention,
            "torch": F.scaled_dot_product_attention,
            "naive": reference.scaled_dot_product_attention,
        }[provider]
        return lambda: fn(q, k, v, is_causal=causal)

    def leaves(self, provider: str) -> list[torch.Tensor]:
        return [self.q, self.k, self.v]


class DecodeCase(AttentionCase):
    """A decode step: ``q (B, H, 1, E)`` against ``k, v (B, H, S, E)``, forward only (inference).

    Memory-bound: throughput is the bytes that must move (K and V read once, q read, out written),
    held to the copy ceiling. The ``read`` provider is this case's own roofline: torch's reductions
    reading the same K and V once (``k.sum(); v.sum()``), in the same cache state as the others (K and V
    of S=4096 fit this Xeon's L3; the copy ceiling's 256 MiB do not), so ``ff/read`` is the share of
    the read-bandwidth ceiling that the decode kernel reaches.
    """

    name = "decode"
    providers = (*PROVIDERS, "read")

    def backend(self, provider: str) -> str:
        return "aten:sum" if provider == "read" else super().backend(provider)

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        if provider != "read":
            return super().forward_fn(provider)
        k, v = self.k, self.v
        return lambda: k.sum() + v.sum()

    def __init__(self, spec: Spec):
        spec = spec.replace(L=int(spec.params.get("L", 1)), causal=False)
        super().__init__(spec)

    def label(self) -> str:
        return f"B={self.B} H={self.H} L={self.L} S={self.S}"

    def tiny(self) -> Spec:
        return self.spec.replace(B=1, H=2, S=64)

    def work(self, mode: str) -> tuple[str, float]:
        return "byte", float(self.B * self.H * (2 * self.S + 2 * self.L) * self.E * self.elt)


def _torch_sdpa_backend(case: AttentionCase) -> str:
    """The kernel torch's SDPA dispatches to for these inputs (``torch._fused_sdp_choice``, private)."""
    try:
        from torch.nn.attention import SDPBackend

        q = torch.empty(case.B, case.H, case.L, case.E, device=case.device, dtype=case.dtype)
        k = torch.empty(case.B, case.H, case.S, case.E, device=case.device, dtype=case.dtype)
        choice = torch._fused_sdp_choice(q, k, k, None, 0.0, case.causal)
        return f"sdpa:{SDPBackend(choice).name.lower()}"
    except Exception:  # a private API: if it moves, say less rather than fail
        return "sdpa"


# ---- packed variable-length sequences --------------------------------------------------------------


def varlen_lengths(n: int, low: int, high: int, seed: int = 0) -> list[int]:
    """``n`` sequence lengths drawn uniformly from [low, high], reproducibly (the bench's default batch)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=g).tolist()


class VarlenCase(Case):
    """Self-attention over packed sequences of ``lengths`` tokens, ``H`` heads of ``E``: ``ff.varlen_attention``
    on ``(total, H, E)``, against torch's SDPA on the zero-padded batch ``(B, H, max L, E)`` with its key
    padding (and causal) mask, and against a Python loop of torch's SDPA over the sequences. All three see
    the same tokens; the padded provider's output is gathered back to ``(total, H, E)`` (its padding rows
    then get a zero gradient)."""

    name = "varlen"
    providers = ("fusedformer", "torch", "torch-loop")

    def __init__(self, spec: Spec):
        super().__init__(spec)
        p = self.p
        self.lengths = [int(n) for n in p["lengths"]]
        self.H, self.E, self.causal = int(p["H"]), int(p["E"]), bool(p["causal"])
        self.B, self.Lmax, self.total = len(self.lengths), max(self.lengths), sum(self.lengths)

    def label(self) -> str:
        return (f"B={self.B} tokens={self.total} max={self.Lmax} H={self.H} E={self.E} "
                f"{'causal' if self.causal else 'full'}")  # fmt: skip

    def tiny(self) -> Spec:
        return self.spec.replace(lengths=[8, 3], H=2)

    def work(self, mode: str) -> tuple[str, float]:
        # FlashAttention's count over the real tokens only: sum_b 4·H·L_b²·E, halved when causal
        fwd = sum(4.0 * self.H * n * n * self.E for n in self.lengths) / (2.0 if self.causal else 1.0)
        return "flop", fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]

    def estimate_bytes(self, provider: str, mode: str) -> int:
        io = 8 * self.total * self.H * self.E * self.elt
        if provider == "torch":  # padded, and torch's masked SDPA on the CPU may build the scores
            return io * self.Lmax * self.B // max(1, self.total) + 3 * self.B * self.H * self.Lmax**2 * _FP32
        return io

    def _explain(self) -> tuple[str, bool]:
        q = torch.empty(self.total, self.H, self.E, device=self.device, dtype=self.dtype)
        cu = torch.zeros(self.B + 1, dtype=torch.int32, device=self.device)
        return _explained(ff.varlen_attention, q, q, q, cu, cu, self.Lmax, self.Lmax, is_causal=self.causal)

    def backend(self, provider: str) -> str:
        if provider == "fusedformer":
            return _fmt_backend(*self._explain())
        return "aten"

    def is_fallback(self, provider: str) -> bool:
        return provider == "fusedformer" and self._explain()[1]

    def build(self) -> None:
        H, E, B, L = self.H, self.E, self.B, self.Lmax
        cu = [0]
        for n in self.lengths:
            cu.append(cu[-1] + n)
        self.cu = torch.tensor(cu, dtype=torch.int32, device=self.device)  # (B + 1,)
        self.q, self.k, self.v = (self._randn(self.total, H, E, requires_grad=True) for _ in range(3))
        self.grad_out = self._randn(self.total, H, E)  # (total, H, E)
        # the padded copies of the same tokens: (B, H, L, E), zeros past each length
        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(B, H, L, E)
            for b, n in enumerate(self.lengths):
                out[b, :, :n] = x[cu[b]:cu[b] + n].transpose(0, 1)
            return out

        self.qp, self.kp, self.vp = (pad(t.detach()).requires_grad_(True) for t in (self.q, self.k, self.v))
        keep = torch.arange(L, device=self.device)[None, :] < torch.tensor(self.lengths, device=self.device)[:, None]
        mask = keep[:, None, None, :].expand(B, 1, L, L)  # (B, 1, L, S): the key padding
        if self.causal:
            mask = mask & reference.causal_mask(L, L, self.device)
        # a padding query row must not be all-masked (torch gives NaN there): let it see key 0
        self.mask = mask | (~keep[:, None, :, None] & (torch.arange(L, device=self.device) == 0))
        self.keep = keep  # (B, L): the real tokens
        # the per-sequence views of the loop: (1, H, L_b, E)
        self.views = [tuple(t[cu[b]:cu[b] + n].transpose(0, 1).unsqueeze(0) for t in (self.q, self.k, self.v))
                      for b, n in enumerate(self.lengths)]  # fmt: skip

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        if provider == "fusedformer":
            q, k, v, cu, L, causal = self.q, self.k, self.v, self.cu, self.Lmax, self.causal
            return lambda: ff.varlen_attention(q, k, v, cu, cu, L, L, is_causal=causal)
        if provider == "torch":
            qp, kp, vp, mask, keep = self.qp, self.kp, self.vp, self.mask, self.keep
            # the real rows of the padded output, (B, L, H, E)[keep] = (total, H, E): a gather of the
            # output only (the padding rows then get gradient 0)
            return lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask).transpose(1, 2)[keep]
        views, causal = self.views, self.causal

        def loop() -> torch.Tensor:
            outs = [F.scaled_dot_product_attention(q, k, v, is_causal=causal) for q, k, v in views]
            return torch.cat([o[0].transpose(0, 1) for o in outs], 0)  # (total, H, E)

        return loop

    def leaves(self, provider: str) -> list[torch.Tensor]:
        return [self.qp, self.kp, self.vp] if provider == "torch" else [self.q, self.k, self.v]


# ---- LayerNorm and bias+GELU: (rows, width) ---------------------------------------------------------


class _RowsCase(Case):
    def __init__(self, spec: Spec):
        super().__init__(spec)
        self.rows, self.width = int(self.p["rows"]), int(self.p["width"])

    def label(self) -> str:
        return f"{self.rows}x{self.width}"

    def tiny(self) -> Spec:
        return self.spec.replace(rows=8, width=64)

    def work(self, mode: str) -> tuple[str, float]:
        # the minimum traffic: forward reads x and writes y; backward reads x and dy and writes dx
        # (weight, bias and the per-row statistics are small and left out)
        n = self.rows * self.width * self.elt
        return "byte", n * {"fwd": 2.0, "bwd": 3.0, "fwd+bwd": 5.0}[mode]

    def estimate_bytes(self, provider: str, mode: str) -> int:
        # measured with the memory probe: the reference needs up to ~13 rows x width buffers for a
        # forward and backward, the fused kernels and torch 2 or 3
        n = self.rows * self.width * max(self.elt, _FP32)
        if provider == "naive" or self.is_fallback(provider):
            return {"fwd": 4, "bwd": 13, "fwd+bwd": 13}[mode] * n
        return 3 * n

    def _explain_args(self) -> tuple:
        raise NotImplementedError

    def _ff_explain(self) -> tuple[str, bool]:
        return _explained(*self._explain_args())

    def fallback_reason(self) -> str:
        return _why_not_fused(*self._explain_args())

    def backend(self, provider: str) -> str:
        if provider == "fusedformer":
            return _fmt_backend(*self._ff_explain())
        return super().backend(provider)

    def is_fallback(self, provider: str) -> bool:
        return provider == "fusedformer" and self._ff_explain()[1]

    def build(self) -> None:
        self.x = self._randn(self.rows, self.width, requires_grad=True)  # (rows, width)
        self.w = self._randn(self.width, requires_grad=True)  # (width,)
        self.b = self._randn(self.width, requires_grad=True)  # (width,)
        self.grad_out = self._randn(self.rows, self.width)  # (rows, width)

    def leaves(self, provider: str) -> list[torch.Tensor]:
        return [self.x, self.w, self.b]


class LayerNormCase(_RowsCase):
    """``F.layer_norm(x (rows, width), (width,), weight, bias)``."""

    name = "layer_norm"

    def _explain_args(self) -> tuple:
        x = torch.empty(self.rows, self.width, device=self.device, dtype=self.dtype)
        w = torch.empty(self.width, device=self.device, dtype=self.dtype)
        return ff.layer_norm, x, (self.width,), w, w

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        x, w, b, shape = self.x, self.w, self.b, (self.width,)
        fn = {"fusedformer": ff.layer_norm, "torch": F.layer_norm, "naive": reference.layer_norm}[provider]
        return lambda: fn(x, shape, w, b, 1e-5)

    def leaves(self, provider: str) -> list[torch.Tensor]:
        return [self.x, self.w, self.b]


class RmsNormCase(_RowsCase):
    """``F.rms_norm(x (rows, width), (width,), weight)``."""

    name = "rms_norm"

    def _explain_args(self) -> tuple:
        x = torch.empty(self.rows, self.width, device=self.device, dtype=self.dtype)
        w = torch.empty(self.width, device=self.device, dtype=self.dtype)
        return ff.rms_norm, x, (self.width,), w

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        x, w, shape = self.x, self.w, (self.width,)
        fn = {"fusedformer": ff.rms_norm, "torch": F.rms_norm, "naive": reference.rms_norm}[provider]
        return lambda: fn(x, shape, w, 1e-6)

    def leaves(self, provider: str) -> list[torch.Tensor]:
        return [self.x, self.w]


class _AddNormCase(_RowsCase):
    """``h = x + r; norm(h)`` with x, r (rows, width): fused in fusedformer (``ff.add_*_norm``), ``x + r``
    then ``F.layer_norm`` / ``F.rms_norm`` in torch. The output timed (and the gradient's way back) is the
    normalised one; residual_out is returned by both and unused, as when the block's last norm feeds
    the head."""

    rms = False

    def work(self, mode: str) -> tuple[str, float]:
        # forward reads x and r, writes y and h; backward reads h and dy, writes dh (dr and dx are one
        # tensor in the fused op; torch's autograd hands the same one to both)
        n = self.rows * self.width * self.elt
        return "byte", n * {"fwd": 4.0, "bwd": 3.0, "fwd+bwd": 7.0}[mode]

    def build(self) -> None:
        super().build()
        self.r = self._randn(self.rows, self.width, requires_grad=True)  # (rows, width)

    def _explain_args(self) -> tuple:
        x = torch.empty(self.rows, self.width, device=self.device, dtype=self.dtype)
        w = torch.empty(self.width, device=self.device, dtype=self.dtype)
        if self.rms:
            return ff.add_rms_norm, x, x, (self.width,), w
        return ff.add_layer_norm, x, x, (self.width,), w, w

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        x, r, w, b, shape = self.x, self.r, self.w, self.b, (self.width,)
        if self.rms:
            if provider == "fusedformer":
                return lambda: ff.add_rms_norm(x, r, shape, w, 1e-6)[0]
            norm = F.rms_norm if provider == "torch" else reference.rms_norm
            return lambda: norm(x + r, shape, w, 1e-6)
        if provider == "fusedformer":
            return lambda: ff.add_layer_norm(x, r, shape, w, b, 1e-5)[0]
        norm = F.layer_norm if provider == "torch" else reference.layer_norm
        return lambda: norm(x + r, shape, w, b, 1e-5)

    def leaves(self, provider: str) -> list[torch.Tensor]:
        return [self.x, self.r, self.w] + ([] if self.rms else [self.b])


class AddLayerNormCase(_AddNormCase):
    name = "add_layer_norm"


class AddRmsNormCase(_AddNormCase):
    name = "add_rms_norm"
    rms = True


class GeluCase(_RowsCase):
    """``gelu(x (rows, width) + bias (width,))``: fused in fusedformer, two ops in torch."""

    name = "gelu"

    def __init__(self, spec: Spec):
        super().__init__(spec)
        self.approximate = str(self.p.get("approximate", "none"))

    def label(self) -> str:
        return f"{self.rows}x{self.width}" + (" tanh" if self.approximate == "tanh" else "")

    def _explain_args(self) -> tuple:
        x = torch.empty(self.rows, self.width, device=self.device, dtype=self.dtype)
        b = torch.empty(self.width, device=self.device, dtype=self.dtype)
        return ff.gelu, x, self.approximate, b

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        x, b, approx = self.x, self.b, self.approximate
        if provider == "fusedformer":
            return lambda: ff.gelu(x, approx, bias=b)
        if provider == "torch":
            return lambda: F.gelu(x + b, approximate=approx)
        return lambda: reference.gelu(x, approx, b)

    def leaves(self, provider: str) -> list[torch.Tensor]:
        return [self.x, self.b]


# ---- linear layers ---------------------------------------------------------------------------------


class LinearCase(Case):
    """``F.linear(x (rows, in), weight (out, in), bias (out,))``: ``ff.linear`` (oneDNN's brgemm, K summed in
    chunks; its backward's two products likewise) against torch's (MKL's sgemm on the CPU). No naive
    provider: a linear layer has no cheaper or costlier textbook form."""

    name = "linear"
    providers = ("fusedformer", "torch")

    def __init__(self, spec: Spec):
        super().__init__(spec)
        self.rows, self.fin, self.fout = int(self.p["rows"]), int(self.p["in_features"]), int(self.p["out_features"])

    def label(self) -> str:
        return f"{self.rows}x{self.fin}->{self.fout}"

    def tiny(self) -> Spec:
        return self.spec.replace(rows=8, in_features=16, out_features=16)

    def work(self, mode: str) -> tuple[str, float]:
        # one GEMM forward (2·rows·in·out), two backward (grad_input, grad_weight); the bias is left out
        gemm = 2.0 * self.rows * self.fin * self.fout
        return "flop", gemm * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]

    def estimate_bytes(self, provider: str, mode: str) -> int:
        return 3 * (self.rows * (self.fin + self.fout) + self.fin * self.fout) * max(self.elt, _FP32)

    def _why_not(self) -> str | None:
        from fusedformer.ops.linear import why_not_fused

        x = torch.empty(1, self.fin, device=self.device, dtype=self.dtype)
        return why_not_fused(x, torch.empty(self.fout, self.fin, device=self.device, dtype=self.dtype), None)

    def fallback_reason(self) -> str:
        return self._why_not() or ""

    def backend(self, provider: str) -> str:
        if provider == "fusedformer":
            return _fmt_backend("aten", True) if self._why_not() else "onednn-brgemm"
        return "aten (mkl)" if self.device.type == "cpu" else "aten"

    def is_fallback(self, provider: str) -> bool:
        return provider == "fusedformer" and self._why_not() is not None

    def build(self) -> None:
        self.x = self._randn(self.rows, self.fin, requires_grad=True)  # (rows, in)
        self.w = (self._randn(self.fout, self.fin) * self.fin**-0.5).requires_grad_(True)  # (out, in)
        self.b = self._randn(self.fout, requires_grad=True)  # (out,)
        self.grad_out = self._randn(self.rows, self.fout)  # (rows, out)

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        x, w, b = self.x, self.w, self.b
        fn = ff.linear if provider == "fusedformer" else F.linear
        return lambda: fn(x, w, b)

    def leaves(self, provider: str) -> list[torch.Tensor]:
        return [self.x, self.w, self.b]


# ---- whole layers ---------------------------------------------------------------------------------


def _fused_layer_class(name: str) -> type | None:
    """``fusedformer.nn.<name>``, imported lazily: the modules are written alongside this suite."""
    try:
        module = importlib.import_module("fusedformer.nn")
    except Exception:
        return None
    return getattr(module, name, None)


class _LayerCase(Case):
    """One ``Transformer{Encoder,Decoder}Layer``, torch.nn's against fusedformer.nn's with the same
    weights (``load_state_dict``), batch_first, in training mode (dropout on)."""

    providers = ("fusedformer", "torch")
    cls_name = ""

    def __init__(self, spec: Spec):
        super().__init__(spec)
        p = self.p
        self.B, self.L = int(p["batch"]), int(p["length"])
        self.d, self.nhead, self.dff = int(p["d_model"]), int(p["nhead"]), int(p["dim_feedforward"])
        self.dropout = float(p["dropout"])
        self.activation = str(p.get("activation", "gelu"))

    def label(self) -> str:
        return f"B={self.B} L={self.L} d={self.d} h={self.nhead} ff={self.dff} p={self.dropout:g}"

    def tiny(self) -> Spec:
        return self.spec.replace(batch=1, length=16, d_model=32, nhead=2, dim_feedforward=64)

    def _kwargs(self) -> dict[str, Any]:
        return dict(
            d_model=self.d,
            nhead=self.nhead,
            dim_feedforward=self.dff,
            dropout=self.dropout,
            activation=self.activation,
            batch_first=True,
            device=self.device,
            dtype=self.dtype,
        )

    def unavailable(self, provider: str) -> str | None:
        if provider == "fusedformer" and _fused_layer_class(self.cls_name) is None:
            return f"unavailable: fusedformer.nn.{self.cls_name} does not exist yet"
        return None

    def _sub_calls(self) -> list[tuple[str, tuple, dict]]:
        """(op, args, kwargs) of the public calls the fused layer is made of, for ``ff.explain``."""
        x = torch.empty(self.B, self.L, self.d, device=self.device, dtype=self.dtype)
        q = torch.empty(
            self.B, self.nhead, self.L, self.d // self.nhead, device=self.device, dtype=self.dtype
        )
        w = torch.empty(self.d, device=self.device, dtype=self.dtype)
        calls = [
            ("attention", (ff.scaled_dot_product_attention, q, q, q), {"dropout_p": self.dropout}),
            ("layer_norm", (ff.layer_norm, x, (self.d,), w, w), {}),
        ]
        if self.activation == "gelu":
            h = torch.empty(self.B, self.L, self.dff, device=self.device, dtype=self.dtype)
            b = torch.empty(self.dff, device=self.device, dtype=self.dtype)
            calls.append(("gelu", (ff.gelu, h, "none", b), {}))
        return calls

    def _sub_backends(self) -> list[tuple[str, str, bool]]:
        """(op, backend, fallback) for the fused ops the layer is made of, as ``ff.explain`` sees them."""
        return [(op, *_explained(*args, **kwargs)) for op, args, kwargs in self._sub_calls()]

    def fallback_reason(self) -> str:
        reasons = []
        for op, args, kwargs in self._sub_calls():
            if _explained(*args, **kwargs)[1]:
                reasons.append(f"{op}: {_why_not_fused(*args, **kwargs)}")
        return " | ".join(reasons)

    def backend(self, provider: str) -> str:
        if provider == "fusedformer":
            parts = [f"{op}={_fmt_backend(b, fb)}" for op, b, fb in self._sub_backends()]
            return ", ".join(parts)
        return "torch.nn"

    def is_fallback(self, provider: str) -> bool:
        return provider == "fusedformer" and any(fb for _, _, fb in self._sub_backends())

    def _linear_flop(self) -> float:
        raise NotImplementedError

    def _attention_flop(self) -> float:
        raise NotImplementedError

    def work(self, mode: str) -> tuple[str, float]:
        # matmul FLOPs of the layer (2·m·n·k per GEMM; backward ×2) plus attention by FlashAttention's
        # count (backward ×2.5); elementwise work is left out
        lin, att = self._linear_flop(), self._attention_flop()
        return "flop", {"fwd": lin + att, "bwd": 2.0 * lin + 2.5 * att, "fwd+bwd": 3.0 * lin + 3.5 * att}[
            mode
        ]

    def _make_layers(self) -> None:
        torch_cls = getattr(torch.nn, self.cls_name)
        self.layers: dict[str, torch.nn.Module] = {"torch": torch_cls(**self._kwargs()).train()}
        self._fused_error: Exception | None = None
        fused_cls = _fused_layer_class(self.cls_name)
        if fused_cls is not None:
            try:
                fused = fused_cls(**self._kwargs()).train()
                fused.load_state_dict(self.layers["torch"].state_dict())
                self.layers["fusedformer"] = fused
            except Exception as e:  # the torch row still runs; the fusedformer row reports this
                self._fused_error = e

    def _layer(self, provider: str) -> torch.nn.Module:
        if provider == "fusedformer" and self._fused_error is not None:
            raise RuntimeError(
                f"fusedformer.nn.{self.cls_name} could not be built with torch.nn's arguments and weights: "
                f"{type(self._fused_error).__name__}: {self._fused_error}"
            )
        return self.layers[provider]

    def leaves(self, provider: str) -> list[torch.Tensor]:
        return [*self._layer(provider).parameters(), *self._inputs()]

    def _inputs(self) -> list[torch.Tensor]:
        raise NotImplementedError


class EncoderCase(_LayerCase):
    name = "encoder"
    cls_name = "TransformerEncoderLayer"

    def _linear_flop(self) -> float:
        tokens = self.B * self.L
        return 2.0 * tokens * (4 * self.d * self.d + 2 * self.d * self.dff)

    def _attention_flop(self) -> float:
        return 4.0 * self.B * self.L * self.L * self.d

    def estimate_bytes(self, provider: str, mode: str) -> int:
        scores = self.B * self.nhead * self.L * self.L * _FP32
        acts = self.B * self.L * (10 * self.d + 3 * self.dff) * _FP32
        return 4 * scores + acts

    def build(self) -> None:
        self._make_layers()
        self.x = self._randn(self.B, self.L, self.d, requires_grad=True)  # (B, L, d)
        self.grad_out = self._randn(self.B, self.L, self.d)  # (B, L, d)

    def _inputs(self) -> list[torch.Tensor]:
        return [self.x]

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        layer, x = self._layer(provider), self.x
        return lambda: layer(x)


class DecoderCase(_LayerCase):
    """Causal self-attention over the target, cross-attention to a memory of the same length."""

    name = "decoder"
    cls_name = "TransformerDecoderLayer"

    def _linear_flop(self) -> float:
        tokens = self.B * self.L
        # self-attention q,k,v,out (4d²), cross q,out (2d²) and k,v of the memory (2d²), FFN (2·d·dff)
        return 2.0 * tokens * (8 * self.d * self.d + 2 * self.d * self.dff)

    def _attention_flop(self) -> float:
        # causal self-attention + full cross-attention (memory of the same length)
        return 4.0 * self.B * self.d * (attention_scores(self.L, self.L, True) + self.L * self.L)

    def estimate_bytes(self, provider: str, mode: str) -> int:
        scores = self.B * self.nhead * self.L * self.L * _FP32
        acts = self.B * self.L * (16 * self.d + 3 * self.dff) * _FP32
        return 8 * scores + acts

    def build(self) -> None:
        self._make_layers()
        self.tgt = self._randn(self.B, self.L, self.d, requires_grad=True)  # (B, L, d)
        self.memory = self._randn(self.B, self.L, self.d, requires_grad=True)  # (B, S=L, d)
        # additive causal mask (L, L): 0 on and below the diagonal, -inf above
        self.tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(
            self.L, device=self.device, dtype=self.dtype
        )
        self.grad_out = self._randn(self.B, self.L, self.d)  # (B, L, d)

    def _inputs(self) -> list[torch.Tensor]:
        return [self.tgt, self.memory]

    def forward_fn(self, provider: str) -> Callable[[], torch.Tensor]:
        layer, tgt, memory, mask = self._layer(provider), self.tgt, self.memory, self.tgt_mask
        return lambda: layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True)


_CASE_TYPES: dict[str, type[Case]] = {
    "attention": AttentionCase,
    "decode": DecodeCase,
    "layer_norm": LayerNormCase,
    "rms_norm": RmsNormCase,
    "add_layer_norm": AddLayerNormCase,
    "add_rms_norm": AddRmsNormCase,
    "gelu": GeluCase,
    "linear": LinearCase,
    "encoder": EncoderCase,
    "decoder": DecoderCase,
    "varlen": VarlenCase,
}


def make_case(spec: Spec) -> Case:
    """The ``Case`` for ``spec`` (inputs are built lazily, by ``ensure_built``)."""
    try:
        return _CASE_TYPES[spec.case](spec)
    except KeyError:
        raise ValueError(f"unknown case {spec.case!r}; expected one of {', '.join(CASES)}") from None


def unit(case: Case, provider: str, mode: str) -> Unit:
    """The timed unit of ``provider`` on ``case`` in ``mode`` (see the module doc)."""
    case.ensure_built()
    forward = case.forward_fn(provider)
    leaves = case.leaves(provider)
    grad_out = case.grad_out

    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    if mode == "fwd":

        def run_fwd(_: Any) -> None:
            with torch.no_grad():
                forward()

        return Unit(run_fwd)
    if mode == "bwd":

        def setup_bwd() -> torch.Tensor:
            clear_grads()
            return forward()

        def run_bwd(out: torch.Tensor) -> None:
            out.backward(grad_out)

        return Unit(run_bwd, setup_bwd)
    if mode == "fwd+bwd":

        def run_fwd_bwd(_: Any) -> None:
            forward().backward(grad_out)

        return Unit(run_fwd_bwd, clear_grads)
    raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def train_unit(case: Case, provider: str) -> Unit:
    """fwd+bwd and bwd from the same calls: forward (with grad), ``mark()``, backward.

    The whole call is the fwd+bwd sample, timed as one unit; from the mark to the end is the bwd
    sample, the backward of a graph built just before it, as in training. One call gives both, so the
    run does not pay a second forward for the bwd mode (what ``unit(case, provider, "bwd")`` does).
    """
    case.ensure_built()
    forward = case.forward_fn(provider)
    leaves = case.leaves(provider)
    grad_out = case.grad_out

    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    def run_train(_: Any, mark: Callable[[], None]) -> None:
        out = forward()
        mark()
        out.backward(grad_out)

    return Unit(run_train, clear_grads, split=True)


def flop_or_byte_rate(case: Case, mode: str, seconds: float) -> tuple[str, float]:
    """("gflops" | "gbps", rate) for one call of ``seconds``."""
    kind, count = case.work(mode)
    rate = count / seconds / 1e9 if seconds > 0 and math.isfinite(seconds) else float("nan")
    return ("gflops" if kind == "flop" else "gbps"), rate
