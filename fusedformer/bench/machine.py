"""Who measured: the machine, the software and the commit, written beside every number.

Beside the CPU's model, the run records the instruction-set features that decide how fast low-precision
products can be here (``FEATURE_FLAGS``: AMX tiles and their bf16/fp16 forms, AVX512-BF16,
AVX512-FP16, read from ``/proc/cpuinfo``; "unknown" where that file does not exist), and, on CPU
runs, the product engine fusedformer's CPU attention uses per dtype, when the installed
``fusedformer.backends`` can say (``cpu_matmul_engines()``).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["FEATURE_FLAGS", "RunInfo", "cpu_features", "features_text", "run_info"]

# /proc/cpuinfo flags that decide the speed of low-precision products -> the name the report groups them by
FEATURE_FLAGS = {
    "amx_tile": "AMX",
    "amx_bf16": "AMX",
    "amx_fp16": "AMX",
    "avx512_bf16": "AVX512-BF16",
    "avx512_fp16": "AVX512-FP16",
}


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
    cpu_features: dict[str, bool] | None = None  # each flag of FEATURE_FLAGS -> present; None: unknown
    # dtype name ("float32", "bfloat16", ...) -> the product engine of fusedformer's CPU attention, as
    # fusedformer.backends.cpu_matmul_engines() names it; empty on CUDA runs or when it cannot say
    matmul_engines: dict[str, str] = dataclasses.field(default_factory=dict)
    matmul_engines_error: str = ""  # why cpu_matmul_engines() failed, when it did

    @property
    def busy(self) -> bool:
        """Other work was running: a quarter of the CPUs (at least half a CPU) were already loaded."""
        return self.load_avg > max(0.5, 0.25 * self.cpus)

    @property
    def features_csv(self) -> str:
        """The CSV's ``cpu_features``: the FEATURE_FLAGS present, space-separated; or "none", "unknown"."""
        if self.cpu_features is None:
            return "unknown"
        return " ".join(f for f, present in self.cpu_features.items() if present) or "none"

    def header(self) -> str:
        lines = [
            f"machine: {self.machine} | device: {self.device} | torch threads: {self.threads}",
            f"cpu features: {features_text(self.cpu_features)}",
        ]
        engines = "fusedformer CPU attention's product engines"
        if self.matmul_engines:
            lines.append(f"{engines}: " + ", ".join(f"{dt} {e}" for dt, e in self.matmul_engines.items()))
        elif self.matmul_engines_error:
            lines.append(f"{engines}: unknown ({self.matmul_engines_error})")
        lines.append(
            f"fusedformer {self.version} @ {self.commit} | torch {self.torch} | python {self.python} | {self.date}"
        )
        if self.busy:
            lines.append(
                f"WARNING: load average {self.load_avg:.1f} on {self.cpus} CPUs when the run started: other "
                "work was running, so times are noisy (ratios less so, being interleaved)"
            )
        return "\n".join(lines)


def _read_cpuinfo() -> str | None:
    """The text of ``/proc/cpuinfo``, or None where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


def _first_processor(cpuinfo: str) -> dict[str, str]:
    """The ``key: value`` fields of the first processor in a ``/proc/cpuinfo`` text."""
    info: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if info:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_features(cpuinfo: str | None) -> dict[str, bool] | None:
    """Each flag of FEATURE_FLAGS -> whether the CPU has it, from a ``/proc/cpuinfo`` text.

    None (unknown) without a text, or when its first processor lists no flags at all (x86 names them
    ``flags``, Arm ``Features``: an Arm CPU then reads as having none of these x86 features, which is so).
    """
    if cpuinfo is None:
        return None
    info = _first_processor(cpuinfo)
    listed = info.get("flags", info.get("Features"))
    if listed is None:
        return None
    flags = set(listed.split())
    return {flag: flag in flags for flag in FEATURE_FLAGS}


def features_text(features: dict[str, bool] | None) -> str:
    """One line for the report, e.g. ``AMX: amx_tile yes, amx_bf16 yes, amx_fp16 no | AVX512-BF16: yes``."""
    if features is None:
        return "unknown"
    groups: dict[str, list[str]] = {}
    for flag, group in FEATURE_FLAGS.items():
        groups.setdefault(group, []).append(flag)
    parts = []
    for group, flags in groups.items():
        if len(flags) == 1:
            parts.append(f"{group}: {'yes' if features[flags[0]] else 'no'}")
        else:
            parts.append(f"{group}: " + ", ".join(f"{f} {'yes' if features[f] else 'no'}" for f in flags))
    return " | ".join(parts)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def _cpu_description(cpuinfo: str | None) -> str:
    info = _first_processor(cpuinfo) if cpuinfo is not None else {}
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


def _matmul_engines() -> tuple[dict[str, str], str]:
    """(engines, error): ``fusedformer.backends.cpu_matmul_engines()`` where the installed package has it."""
    from fusedformer import backends

    if not hasattr(backends, "cpu_matmul_engines"):
        return {}, ""
    try:
        return {str(k): str(v) for k, v in backends.cpu_matmul_engines().items()}, ""
    except Exception as e:  # the header says so; the run goes on
        return {}, f"cpu_matmul_engines() failed: {type(e).__name__}: {e}"


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

    cuda = device.type == "cuda"
    dev = torch.cuda.get_device_name(device) if cuda else "cpu"
    cpuinfo = _read_cpuinfo()
    engines, engines_error = ({}, "") if cuda else _matmul_engines()
    return RunInfo(
        machine=_cpu_description(cpuinfo),
        device=dev,
        threads=torch.get_num_threads(),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        version=getattr(fusedformer, "__version__", "unknown"),
        commit=_git_commit(),
        torch=torch.__version__,
        python=platform.python_version(),
        cpus=_cpus(),
        load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        cpu_features=cpu_features(cpuinfo),
        matmul_engines=engines,
        matmul_engines_error=engines_error,
    )
