"""What ``ff.patch`` did: the report it returns and the state ``ff.unpatch`` undoes."""

from __future__ import annotations

import dataclasses

from torch import nn

__all__ = ["PatchReport", "PatchState", "STATE_ATTR", "module_path"]

STATE_ATTR = "_fusedformer_patch"  # where a patched model keeps its PatchState


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
class PatchState:
    """Everything ``unpatch`` needs to undo, in the order it was done."""

    swapped: list[tuple[nn.Module, type]] = dataclasses.field(default_factory=list)
    replaced: list[tuple[nn.Module, str, nn.Module]] = dataclasses.field(default_factory=list)
    configs: list[tuple[nn.Module, str, object]] = dataclasses.field(default_factory=list)
    report: PatchReport = dataclasses.field(default_factory=PatchReport)


def module_path(name: str) -> str:
    """A module's path in the report: its qualified name, or ``<model>`` for the model itself."""
    return name if name else "<model>"
