"""Peak extra memory of ONE provider call, measured in a fresh process.

The measuring process must be fresh: a process's high-water mark (``VmHWM``) only grows, and memory
that an earlier call freed may be kept by the allocator and reused by the next one, which would then
look free. Starting Python and importing torch for every measurement costs seconds, so one server
process imports torch (and runs nothing), then ``fork()``s a child per measurement. The child:

1. runs the same case once at a tiny size, so that lazy initialisation (thread pools, code pages,
   kernels' first-call buffers) is not counted as the call's memory;
2. builds the real inputs (they are part of the baseline, not of the call);
3. resets its high-water mark to its current resident size (``echo 5 > /proc/self/clear_refs``) and
   reads that baseline from ``VmRSS``;
4. makes the call and reads ``VmHWM``: the difference is the call's peak extra memory.

For a training probe, step 4 is split: the forward (with grad) is measured, the mark is reset again,
then the backward is measured. That gives both ``fwd+bwd`` (the larger peak over the first baseline)
and ``bwd`` (the backward's peak over the memory held after the forward: the saved graph) from one
call. ``ru_maxrss`` is no use here: a forked child inherits its parent's.

On CUDA, the server runs each measurement itself (no fork) and reads the caching allocator's
``max_memory_allocated`` around the call instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

__all__ = ["MemoryProbe", "available_bytes", "total_bytes"]

_KIB = 1024
_MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> tuple[int, bool]:
    """(baseline KiB, whether the high-water mark could be reset to it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS"), True
    except OSError:
        return _status_kib("VmHWM"), False


def _meminfo_kib(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def available_bytes(device: str = "cpu") -> int | None:
    """Memory a new allocation can get now: ``MemAvailable``, or the GPU's free memory."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    kib = _meminfo_kib("MemAvailable")
    return kib * _KIB if kib is not None else None


def total_bytes(device: str = "cpu") -> int | None:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[1])
    kib = _meminfo_kib("MemTotal")
    return kib * _KIB if kib is not None else None


# ---- inside the server and its children -------------------------------------------------------------


def _measure_cpu(job: dict[str, Any]) -> dict[str, Any]:
    import gc
    import warnings

    import torch

    import fusedformer as ff
    from fusedformer.bench.cases import Spec, make_case, unit

    warnings.simplefilter("ignore", ff.FallbackWarning)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    spec, provider, kind = Spec.from_json(job["spec"]), job["provider"], job["kind"]
    case = make_case(spec)
    tiny = make_case(case.tiny())
    for mode in ("fwd",) if kind == "fwd" else ("fwd", "fwd+bwd"):
        u = unit(tiny, provider, mode)
        u.run(u.setup() if u.setup else None)
    del tiny, u
    case.ensure_built()
    forward, grad_out = case.forward_fn(provider), case.grad_out
    for t in case.leaves(provider):
        t.grad = None
    gc.collect()
    if kind == "fwd":
        base, reset = _reset_peak()
        with torch.no_grad():
            out = forward()
        peak = _status_kib("VmHWM")
        del out
        return {"fwd": (peak - base) / _KIB, "hwm_reset": reset}
    base, reset = _reset_peak()
    out = forward()
    peak_fwd = _status_kib("VmHWM")
    base_bwd, _ = _reset_peak()
    out.backward(grad_out)
    peak_bwd = _status_kib("VmHWM")
    result = {"fwd+bwd": (max(peak_fwd, peak_bwd) - base) / _KIB, "hwm_reset": reset}
    # without a reset the backward's mark still holds the forward's peak: no separate bwd figure
    result["bwd"] = (peak_bwd - base_bwd) / _KIB if reset else None
    return result


def _measure_cuda(job: dict[str, Any]) -> dict[str, Any]:
    import gc
    import warnings

    import torch

    import fusedformer as ff
    from fusedformer.bench.cases import Spec, make_case, unit

    warnings.simplefilter("ignore", ff.FallbackWarning)
    spec, provider, kind = Spec.from_json(job["spec"]), job["provider"], job["kind"]
    case = make_case(spec)
    tiny = make_case(case.tiny())
    u = unit(tiny, provider, "fwd" if kind == "fwd" else "fwd+bwd")
    u.run(u.setup() if u.setup else None)
    del tiny, u
    case.ensure_built()
    forward, grad_out = case.forward_fn(provider), case.grad_out
    for t in case.leaves(provider):
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        if kind == "fwd":
            with torch.no_grad():
                out = forward()
            torch.cuda.synchronize()
            return {"fwd": (torch.cuda.max_memory_allocated() - base) / _MIB, "hwm_reset": True}
        out = forward()
        torch.cuda.synchronize()
        peak_fwd = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        base_bwd = torch.cuda.memory_allocated()
        out.backward(grad_out)
        torch.cuda.synchronize()
        peak_bwd = torch.cuda.max_memory_allocated()
        return {
            "fwd+bwd": (max(peak_fwd, peak_bwd) - base) / _MIB,
            "bwd": (peak_bwd - base_bwd) / _MIB,
            "hwm_reset": True,
        }
    finally:
        del case, forward
        gc.collect()
        torch.cuda.empty_cache()


def _run_forked(job: dict[str, Any]) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, write one JSON document, leave without cleanup
        code = 0
        try:
            os.close(read_fd)
            os.dup2(2, 1)  # stray prints must not mix with the server's replies
            try:
                result = _measure_cpu(job)
            except BaseException as e:  # noqa: BLE001  (reported to the caller as the probe's error)
                result = {"error": f"{type(e).__name__}: {e}"}
            with os.fdopen(write_fd, "w") as f:
                json.dump(result, f)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = " (likely the out-of-memory killer)" if sig == 9 else ""
        return {"error": f"probe killed by signal {sig}{why}"}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"error": f"probe exited with status {os.waitstatus_to_exitcode(status)} and no result"}


def serve() -> None:
    """The server loop: one JSON job per stdin line, one JSON reply per stdout line."""
    import gc

    import torch  # noqa: F401  (imported once here, inherited by every forked child)
    import torch.fx.experimental.symbolic_shapes  # noqa: F401  (``backward(grad)`` imports it, and sympy, lazily)

    import fusedformer as ff
    import fusedformer.bench.cases  # noqa: F401

    # what the backends import on their first call (triton, say), imported here once; explain runs nothing
    x = torch.zeros(1, 1, 2, 2)
    for args in ((ff.scaled_dot_product_attention, x, x, x), (ff.layer_norm, x, (2,)), (ff.gelu, x)):
        try:
            ff.explain(*args)
        except Exception:  # noqa: BLE001  (only a warm-up: a failure shows up in the measurement)
            pass
    del x
    gc.freeze()  # the children's gc.collect() need not walk torch's import-time objects

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if job["device"].startswith("cuda"):
            try:
                result = _measure_cuda(job)
            except Exception as e:
                result = {"error": f"{type(e).__name__}: {e}"}
        else:
            result = _run_forked(job)
        out.write(json.dumps(result) + "\n")
        out.flush()
    # stdin closed: leave at once; an interpreter teardown of frozen objects only makes noise (nanobind)
    os._exit(0)


# ---- in the benchmark's process -----------------------------------------------------------------------


class MemoryProbe:
    """Client of the probe server; start it once (it takes torch's import time), ask many times.

    ``measure(spec, provider, "fwd")`` returns ``{"fwd": MiB}``; ``"train"`` returns
    ``{"fwd+bwd": MiB, "bwd": MiB}``; a failure returns ``{"error": why}``.
    """

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from fusedformer.bench.memory import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        if not ready:
            raise RuntimeError("the memory probe server did not start (see stderr)")
        return proc

    def measure(self, spec: Any, provider: str, kind: str) -> dict[str, Any]:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            job = {
                "spec": spec.to_json(),
                "provider": provider,
                "kind": kind,
                "device": spec.device,
                "threads": self.threads,
            }
            assert self._proc.stdin is not None and self._proc.stdout is not None
            try:
                self._proc.stdin.write(json.dumps(job) + "\n")
                self._proc.stdin.flush()
                reply = self._proc.stdout.readline()
            except (BrokenPipeError, OSError) as e:
                return {"error": f"memory probe server failed: {e}"}
            if not reply:
                return {"error": "memory probe server exited"}
            return json.loads(reply)

    def close(self) -> None:
        if self._proc is not None:
            try:
                if self._proc.stdin:
                    self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except Exception:
                self._proc.kill()
            self._proc = None

    def __enter__(self) -> MemoryProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
