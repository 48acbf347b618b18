"""DTensor sharding rules for the fusedformer ops: what tensor parallelism needs to run them.

Under ``torch.distributed.tensor`` (DTensor: ``parallelize_module``, transformers' ``tp_plan``), an op is
run shard by shard only if a sharding strategy is registered for it; otherwise DTensor raises
``NotImplementedError: Operator fusedformer.<op> does not have a sharding strategy registered``. Each
op family registers its rules here through torch's public API for custom ops,
``torch.distributed.tensor.experimental.register_sharding``: a rule takes the op's arguments (tensors
arrive as ``DTensorSpec``: ``.shape`` global, ``.placements``, ``.mesh``) and returns the layouts the
op can run in, each as ``(output placements, input placements)`` for one mesh dim; DTensor expands
them over every mesh dim, picks the layout that needs the least communication (the inputs' own
layout when it is one of them), redistributes the inputs to it and runs the op on the local shards.

How to add an op's rules (a few lines in its ``ops/<family>.py``)::

    @sharding.rules("rms_norm_fwd", "triton_rms_norm_fwd")  # every overload that shares the rules
    def _rms_norm_fwd_rules(input, normalized_shape, weight, eps):
        return [
            sharding.replicated(3, 4),  # Replicate() everywhere: 3 outputs, 4 args (always list it first)
            *(  # a placement per output, then one per argument (None for a non-tensor or absent one)
                ([Shard(d), Shard(d)], [Shard(d), None, R if weight is not None else None, None])
                for d in range(input.ndim - len(normalized_shape))
            ),
        ]

and list the rules in the public function's docstring. ``rules`` records the rule (registered when
``fusedformer.ops`` has imported every family, or at once after that) and wraps it so that:

- a rule may raise ``ValueError`` to refuse a layout (say, GQA heads that do not shard evenly); the
  message reaches the caller;
- when no listed layout takes the inputs as they arrive on some mesh dim without gathering a shard,
  DTensor's redistribution would gather it to full size (all-gather): that is said once, as a
  ``ShardingWarning`` naming the op, the argument and the layouts, or raised under
  ``FUSEDFORMER_STRICT=1``. Never silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fusedformer import backends

__all__ = ["rules", "replicated", "row_layouts", "ShardingWarning", "ShardingError"]


class ShardingWarning(UserWarning):
    """DTensor gathers a sharded input to run a fusedformer op (said once per op and layout)."""


class ShardingError(ValueError):
    """A layout a fusedformer op cannot run in, or a gather that ``FUSEDFORMER_STRICT=1`` forbids."""


Rule = Callable[..., Sequence[tuple[Sequence[Any], Sequence[Any]]]]
_RULES: list[tuple[tuple[str, ...], Rule]] = []
_installed = False
_warned: set[str] = set()


def replicated(n_outputs: int, n_args: int, args: Sequence[Any] | None = None) -> tuple[list, list]:
    """The all-``Replicate()`` layout: every output and every tensor argument replicated.

    With ``args`` given, a ``None`` argument (an absent optional tensor) or a non-tensor gets ``None``.
    """
    from torch.distributed.tensor import Replicate

    ins = [Replicate() if args is None or _is_tensor(a) else None for a in (args or [None] * n_args)]
    return [Replicate()] * n_outputs, ins


def row_layouts(lead_dims: int, outputs: Sequence[str | None], inputs: Sequence[str | None]) -> list:
    """The layouts of a row-wise op (a norm: rows independent, the last dims normalised): replicated,
    then one layout per leading dim d in which every ``"S"`` is ``Shard(d)``, ``"R"`` ``Replicate()``
    (weights), ``"P"`` ``Partial()`` (their gradients, summed over each shard's rows) and ``None`` a
    non-tensor or absent argument."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    def place(token, d):
        return {"S": Shard(d), "R": Replicate(), "P": Partial(), None: None}[token]

    layouts = [([Replicate() for _ in outputs], [None if t is None else Replicate() for t in inputs])]
    for d in range(lead_dims):
        layouts.append(([place(t, d) for t in outputs], [place(t, d) for t in inputs]))
    return layouts


def rules(*op_names: str) -> Callable[[Rule], Rule]:
    """Records ``rule`` as the DTensor sharding rules of ``torch.ops.fusedformer.<name>`` for each name.

    Names of ops not defined in this process (a Triton op without Triton) are skipped at registration.
    """

    def decorate(rule: Rule) -> Rule:
        _RULES.append((op_names, rule))
        if _installed:
            _register(op_names, rule)
        return rule

    return decorate


# ---- registration ---------------------------------------------------------------------------------


def _is_tensor(a: Any) -> bool:
    return hasattr(a, "placements") and hasattr(a, "shape")  # a DTensorSpec (or a DTensor)


def _gathered(actual, wanted) -> bool:
    """Whether redistributing one mesh dim from ``actual`` to ``wanted`` gathers a shard."""
    from torch.distributed.tensor import Shard

    return isinstance(actual, Shard) and actual != wanted  # Replicate -> x slices; Partial -> x reduces


def _check_gathers(name: str, schema: torch.FunctionSchema, args: tuple, layouts) -> None:
    """Warns (raises when strict) if some mesh dim of the inputs fits no layout without a gather."""
    tensors = [(i, a) for i, a in enumerate(args) if _is_tensor(a)]
    if not tensors:
        return
    for m in range(tensors[0][1].mesh.ndim):

        def fits(layout) -> bool:
            wanted = layout[1]
            return all(wanted[i] is not None and not _gathered(a.placements[m], wanted[i]) for i, a in tensors)

        if any(fits(layout) for layout in layouts):
            continue
        given = ", ".join(f"{schema.arguments[i].name}={a.placements[m]}" for i, a in tensors)
        message = (
            f"fusedformer.{name}: no sharding of this op takes the inputs as they are on mesh dim {m} "
            f"({given}); DTensor gathers the sharded ones to run it (see the op's docstring for the layouts "
            f"it runs in)"
        )
        if backends._strict():
            raise ShardingError(message + "; FUSEDFORMER_STRICT=1 forbids the gather")
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, ShardingWarning, stacklevel=2)


def _register(op_names: Sequence[str], rule: Rule) -> None:
    from torch.distributed.tensor.experimental import register_sharding

    for name in op_names:
        if not hasattr(torch.ops.fusedformer, name):
            continue
        op = getattr(torch.ops.fusedformer, name).default
        schema = op._schema

        def checked(*args, _name=name, _schema=schema, **kwargs):
            # register_sharding passes the arguments positionally as the caller gave them; fill in
            # the rest by name so that a rule sees every argument of the schema.
            rest = [kwargs.pop(a.name) if a.name in kwargs else a.default_value for a in _schema.arguments[len(args):]]
            args = (*args, *rest)
            layouts = [(list(o), list(i)) for o, i in rule(*args)]
            _check_gathers(_name, _schema, args, layouts)
            n_args = len(_schema.arguments)  # a rule may list placements for arguments this overload lacks
            return [(o, i[:n_args]) for o, i in layouts]

        register_sharding(op)(checked)


def _install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    for op_names, rule in _RULES:
        _register(op_names, rule)


def _install_when_ready() -> None:
    """Registers every recorded rule (called once, by fusedformer.ops after every family recorded its own)."""
    # NOTE [2026-12-02]: torch.distributed.tensor is already loaded by then (torch._dynamo, which the op
    # registrations import, imports it), so registering costs no import time.
    if torch.distributed.is_available():
        _install()
