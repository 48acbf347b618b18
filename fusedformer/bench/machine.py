"""Who measured: the machine, the software and the commit, written beside every number."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["RunInfo", "run_info"]


@dataclasses.dataclass
class RunInfo:
    machine: str  # e.g. "AMD EPYC (family 26 model 2), 2 CPUs, avx512f, 23.5 GiB"
    device: str  # "cpu" or the GPU's name
    threads: int  # torch.get_num_threads()
    date: str  # ISO 8601, local time with offset
    version: str  # fusedformer.__version__
    commit: str  # short hash, "+dirty" when the tree has uncommitted changes; "unknown" outside git
    torch: str
    python: str
    cpus: int  # CPUs this process may run on
    load_avg: float  # 1-minute load average when the run started

    @property
    def busy(self) -> bool:
        """Other work was running: a quarter of the CPUs (at least half a CPU) were already loaded."""
        return self.load_avg > max(0.5, 0.25 * self.cpus)

    def header(self) -> str:
        text = (
            f"machine: {self.machine} | device: {self.device} | torch threads: {self.threads}\n"
            f"fusedformer {self.version} @ {self.commit} | torch {self.torch} | python {self.python} | {self.date}"
        )
        if self.busy:
            text += (
                f"\nWARNING: load average {self.load_avg:.1f} on {self.cpus} CPUs when the run started: other work "
                "was running, so times are noisy (ratios less so, being interleaved)"
            )
        return text


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def _cpu_description() -> str:
    info = _cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in info and "model" in info:
        model += f" (family {info['cpu family']} model {info['model']})"
    parts = [model, f"{_cpus()} CPUs"]
    flags = set(info.get("flags", "").split())
    simd = next((f for f in ("avx512f", "avx2", "avx", "asimd", "neon") if f in flags), None)
    if simd:
        parts.append(simd)
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        parts.append(f"{kib / 2**20:.1f} GiB")
    except (OSError, ValueError, IndexError):
        pass
    return ", ".join(parts)


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]  # the checkout that holds fusedformer/
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(device: torch.device) -> RunInfo:
    import fusedformer

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return RunInfo(
        machine=_cpu_description(),
        device=dev,
        threads=torch.get_num_threads(),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        version=getattr(fusedformer, "__version__", "unknown"),
        commit=_git_commit(),
        torch=torch.__version__,
        python=platform.python_version(),
        cpus=_cpus(),
        load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
    )
