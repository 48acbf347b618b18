"""Tensor parallelism for the fused modules: ``HeadParallel``, the ``parallelize_module`` style that
shards a ``MultiheadAttention`` over its heads.

torch's ``ColwiseParallel`` / ``RowwiseParallel`` shard ``nn.Linear``; ``MultiheadAttention`` packs its
q, k, v projections into one ``in_proj_weight (3E, E)``, whose plain ``Shard(0)`` would hand rank 0 all
of q and part of k. ``HeadParallel`` shards it the way the heads split::

    in_proj_weight (3E, E) = [W_q; W_k; W_v]   _StridedShard(0, split_factor=3): rank r holds
                                               [W_q rows of its heads; W_k rows; W_v rows]
    out_proj.weight (E, E)                     Shard(1)  (row-wise: each rank's heads' columns)

so that ``q, k, v (B, H, L, hd)`` come out ``Shard(1)`` (each rank's H / n heads), the attention runs on
them through fusedformer's sharding rules without communication, and the out-projection sums the
ranks' partial products (``Partial()``, reduced where the next op needs it). Separate
``q/k/v_proj_weight`` (``kdim``/``vdim`` set) are sharded ``Shard(0)`` each. Inputs that are plain
tensors become ``Replicate()`` DTensors; the output is a DTensor.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HeadParallel"]


def _style_base():
    from torch.distributed.tensor.parallel import ParallelStyle

    return ParallelStyle


class HeadParallel(_style_base()):
    """``parallelize_module(layer, mesh, {"self_attn": HeadParallel(), ...})``: attention heads split
    across a 1-D mesh; ``num_heads`` must be a multiple of the mesh's size."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
        from torch.distributed.tensor.placement_types import _StridedShard

        from fusedformer.nn.attention import MultiheadAttention

        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"HeadParallel: expected a MultiheadAttention, got {type(module).__name__}")
        if not isinstance(module, MultiheadAttention):
            raise TypeError("HeadParallel: torch.nn.MultiheadAttention's own forward cannot run on DTensors; "
                            "use fusedformer.nn.MultiheadAttention (ff.patch converts it)")
        if device_mesh.ndim != 1:
            raise ValueError(f"HeadParallel: expected a 1-D mesh, got {device_mesh.ndim} dims")
        n = device_mesh.size()
        if module.num_heads % n != 0:
            raise ValueError(f"HeadParallel: num_heads ({module.num_heads}) must be a multiple of the mesh size ({n})")
        by_heads = {
            "in_proj_weight": [_StridedShard(0, split_factor=3)],  # [W_q; W_k; W_v], each cut by heads
            "in_proj_bias": [_StridedShard(0, split_factor=3)],
            "q_proj_weight": [Shard(0)],
            "k_proj_weight": [Shard(0)],
            "v_proj_weight": [Shard(0)],
            "weight": [Shard(1)],  # out_proj: the columns that read each rank's heads
        }

        def partition(name: str, mod: nn.Module, mesh) -> None:
            for pname, p in list(mod.named_parameters(recurse=False)):
                placements = by_heads.get(pname, [Replicate()])
                mod.register_parameter(pname, nn.Parameter(distribute_tensor(p.data, mesh, placements)))

        def inputs(mod, args, mesh):
            made: dict[int, DTensor] = {}  # one DTensor per tensor: self-attention passes x as q, k and v

            def replicated(a):
                if not isinstance(a, torch.Tensor) or isinstance(a, DTensor):
                    return a
                return made.setdefault(id(a), DTensor.from_local(a, mesh, [Replicate()], run_check=False))

            return tuple(replicated(a) for a in args)

        return distribute_module(module, device_mesh, partition, input_fn=inputs)
